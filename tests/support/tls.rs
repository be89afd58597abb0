//! Certificates made at test time: a private CA, a server certificate for `localhost` only
//! (connecting to 127.0.0.1 is a host name mismatch) signed by it, a client certificate, a second CA that signed nothing the servers
//! use (the "wrong CA"), and an expired server certificate.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::TestDir;

/// PEM files in their own directory.
pub struct Certs {
    pub dir: TestDir,
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

fn leaf(ca: &Ca, names: &[&str], client: bool, expired: bool) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("client"),
    );
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Certs {
    pub fn new() -> Certs {
        let dir = TestDir::new("certs");
        let good = ca("engagement-cdc test CA");
        let wrong = ca("some other CA");
        let write = |name: &str, text: &str| std::fs::write(dir.path.join(name), text).unwrap();
        write("ca.pem", &good.cert.pem());
        write("wrong-ca.pem", &wrong.cert.pem());
        let (cert, key) = leaf(&good, &["localhost"], false, false);
        write("server.pem", &cert);
        write("server.key", &key);
        let (cert, key) = leaf(&good, &["localhost"], false, true);
        write("expired.pem", &cert);
        write("expired.key", &key);
        let (cert, key) = leaf(&good, &["engagement-cdc"], true, false);
        write("client.pem", &cert);
        write("client.key", &key);
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    pub fn wrong_ca(&self) -> PathBuf {
        self.path("wrong-ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// A copy of a file into `dir`, readable by its owner only (Postgres insists on that
    /// for keys).
    pub fn copy_private(&self, name: &str, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let to = dir.join(name);
        std::fs::copy(self.path(name), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
        to
    }
}
