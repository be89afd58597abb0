//! UTC calendar arithmetic and RFC 3339 text of microsecond timestamps.

/// The wall clock in µs since 1970 (0 if the clock is before 1970).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Broken-down UTC time of microseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcParts {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micros: u32,
}

pub fn utc_parts(us: i64) -> UtcParts {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    UtcParts {
        year,
        month,
        day,
        hour: sod / 3600,
        minute: (sod / 60) % 60,
        second: sod % 60,
        micros,
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since 1970 (UTC; the year clamped to 0..=9999).
fn second_text(secs: i64) -> [u8; 19] {
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400) as u32;
    let mut t = [0u8; 19];
    let two = |t: &mut [u8], at: usize, v: u32| {
        t[at] = b'0' + (v / 10) as u8;
        t[at + 1] = b'0' + (v % 10) as u8;
    };
    let y = year.clamp(0, 9999) as u32;
    two(&mut t, 0, y / 100);
    two(&mut t, 2, y % 100);
    t[4] = b'-';
    two(&mut t, 5, month);
    t[7] = b'-';
    two(&mut t, 8, day);
    t[10] = b'T';
    two(&mut t, 11, sod / 3600);
    t[13] = b':';
    two(&mut t, 14, (sod / 60) % 60);
    t[16] = b':';
    two(&mut t, 17, sod % 60);
    t
}

thread_local! {
    /// The last second written and its text: the events of a batch mostly share it.
    static LAST_SECOND: std::cell::Cell<(i64, [u8; 19])> =
        const { std::cell::Cell::new((i64::MIN, [0; 19])) };
}

/// RFC 3339 UTC: `YYYY-MM-DDTHH:MM:SSZ`, with `.ffffff` when the microseconds are not zero.
pub fn write_rfc3339_us(out: &mut Vec<u8>, us: i64) {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000) as u32;
    let text = LAST_SECOND.with(|last| {
        let (s, t) = last.get();
        if s == secs {
            t
        } else {
            let t = second_text(secs);
            last.set((secs, t));
            t
        }
    });
    let mut buf = [0u8; 27];
    buf[..19].copy_from_slice(&text);
    let mut n = 19;
    if micros != 0 {
        buf[n] = b'.';
        n += 1;
        let mut div = 100_000;
        while div > 0 {
            buf[n] = b'0' + ((micros / div) % 10) as u8;
            n += 1;
            div /= 10;
        }
    }
    buf[n] = b'Z';
    out.extend_from_slice(&buf[..n + 1]);
}

pub fn rfc3339_us(us: i64) -> String {
    let mut out = Vec::with_capacity(27);
    write_rfc3339_us(&mut out, us);
    String::from_utf8(out).expect("ASCII")
}

/// An RFC 3339 timestamp with an offset (`2026-01-08T14:21:52Z`, `…+03:00`) → µs since 1970.
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    Some(ts.as_microsecond())
}
