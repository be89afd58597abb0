import sys, statistics as st
rows=[]
for l in open(sys.argv[1]):
    p=l.split()
    if len(p)!=9: continue
    name=p[0]; n,cmin,cmax,rd,tk,ad,t0,t1=map(int,p[1:])
    if cmin==0 or t1-cmin>1_000_000 or rd==0: continue
    rows.append((name,n,cmin,cmax,rd,tk,ad,t0,t1))
for sink in ('redis','http'):
    R=[r for r in rows if r[0]==sink]
    def q(v,p): v=sorted(v); return v[min(len(v)-1,int(len(v)*p))]
    parts={'c->read':[r[4]-r[2] for r in R],'gather':[r[5]-r[4] for r in R],'take->add':[r[6]-r[5] for r in R],'add->start':[r[7]-r[6] for r in R],'write':[r[8]-r[7] for r in R],'total':[r[8]-r[2] for r in R],'n':[r[1] for r in R]}
    print(sink,len(R))
    for k,v in parts.items(): print(f"  {k:10s} p50 {q(v,.5):6d} p90 {q(v,.9):6d} p99 {q(v,.99):6d} max {max(v)}")
    slow=[r for r in R if r[8]-r[2]>9000]
    print("  slow writes",len(slow))
    agg={k:0 for k in parts if k not in('total','n')}
    for r in slow:
        agg['c->read']+=r[4]-r[2];agg['gather']+=r[5]-r[4];agg['take->add']+=r[6]-r[5];agg['add->start']+=r[7]-r[6];agg['write']+=r[8]-r[7]
    if slow: print("  slow mean parts", {k:v//len(slow) for k,v in agg.items()})
    for r in slow[:15]:
        print("   ", r[1], "c->read",r[4]-r[2],"gather",r[5]-r[4],"t->a",r[6]-r[5],"a->s",r[7]-r[6],"w",r[8]-r[7],"tot",r[8]-r[2])
