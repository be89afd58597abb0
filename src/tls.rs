//! TLS for every connection: one rustls stack with the ring provider, no OpenSSL.
//!
//! Each server's section names its files the same way (`ca_file`, `cert_file`, `key_file`;
//! Postgres spells them `sslrootcert`, `sslcert`, `sslkey` as libpq does), and how much is
//! verified is a [`Verify`]. Files are read when a connection is configured, so a wrong path
//! is a configuration error (exit 2) naming the key; a handshake that fails is explained by
//! [`explain`] (unknown authority, wrong host name, expired). docs/operations.md, "TLS and
//! secrets", is the user's side of this.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

use crate::error::UsageError;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain to a trusted root and the host name (`verify-full`, and every `https://` or
    /// `rediss://` connection).
    Full,
    /// Chain to a trusted root, any host name (`verify-ca`).
    ChainOnly,
    /// Encryption only (`require`, `prefer`): what libpq does without a root certificate.
    Nothing,
}

/// The certificate files of one connection; `None` where the key is not set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Roots to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (chain) and its key, for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The configuration keys these came from, for messages: (ca, cert, key).
    pub keys: (&'static str, &'static str, &'static str),
}

impl TlsFiles {
    /// The files of a sink's section: its `ca_file`, `cert_file` and `key_file` keys.
    pub fn of_section(
        section: &str,
        ca_file: &Option<PathBuf>,
        cert_file: &Option<PathBuf>,
        key_file: &Option<PathBuf>,
    ) -> TlsFiles {
        let keys = match section {
            "clickhouse" => (
                "clickhouse.ca_file",
                "clickhouse.cert_file",
                "clickhouse.key_file",
            ),
            "redis" => ("redis.ca_file", "redis.cert_file", "redis.key_file"),
            "http" => ("http.ca_file", "http.cert_file", "http.key_file"),
            _ => ("ca_file", "cert_file", "key_file"),
        };
        TlsFiles {
            ca_file: ca_file.clone(),
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            keys,
        }
    }
}

/// A sink section's client settings when its URL uses the TLS `scheme` (`https://`,
/// `rediss://`), always fully verified; `None` for a plaintext URL.
pub fn for_scheme(
    section: &str,
    url: &str,
    scheme: &str,
    ca_file: &Option<PathBuf>,
    cert_file: &Option<PathBuf>,
    key_file: &Option<PathBuf>,
) -> Result<Option<ClientConfig>, UsageError> {
    if !url.starts_with(scheme) {
        return Ok(None);
    }
    let files = TlsFiles::of_section(section, ca_file, cert_file, key_file);
    client_config(section, &files, Verify::Full).map(Some)
}

/// The one crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Make ring the process default too, for code that asks rustls for the default provider.
/// Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client configuration for one server; `what` names it in errors ("postgres", …).
pub fn client_config(
    what: &str,
    files: &TlsFiles,
    verify: Verify,
) -> Result<ClientConfig, UsageError> {
    let setup_failed =
        |e: &dyn std::fmt::Display| UsageError::new(format!("{what}: TLS setup failed: {e}"));
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup_failed(&e))?;
    let builder = match verify {
        Verify::Full => builder.with_root_certificates(root_store(what, files)?),
        Verify::ChainOnly => {
            let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(what, files)?),
                provider(),
            )
            .build()
            .map_err(|e| setup_failed(&e))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { chain: Some(chain) }))
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient { chain: None })),
    };
    let (_, cert_key, key_key) = files.keys;
    match (&files.cert_file, &files.key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert_key, cert)?;
            let private = read_key(key_key, key)?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                UsageError::new(format!(
                    "{cert_key} {} and {key_key} {} do not make a client certificate: {e}",
                    cert.display(),
                    key.display()
                ))
            })
        }
        _ => Err(UsageError::new(format!(
            "{what}: a client certificate needs both {cert_key} and {key_key}; set both or neither"
        ))),
    }
}

/// The roots: `ca_file` when set, else the system's.
fn root_store(what: &str, files: &TlsFiles) -> Result<RootCertStore, UsageError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            let (added, _) = roots.add_parsable_certificates(read_certs(files.keys.0, path)?);
            if added == 0 {
                return Err(UsageError::new(format!(
                    "{} {}: no usable CA certificate in it; give the PEM file of the CA that signed the server's certificate",
                    files.keys.0,
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(UsageError::new(format!(
                    "{what}: no system CA certificates found; install the ca-certificates package or set {}",
                    files.keys.0
                )));
            }
        }
    }
    Ok(roots)
}

/// Every certificate of a PEM file.
pub fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, UsageError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        UsageError::new(format!(
            "{key} {}: cannot read certificates: {e}; give a readable PEM file",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if certs.is_empty() {
        return Err(UsageError::new(format!(
            "{key} {}: no certificate in it; give a PEM file with -----BEGIN CERTIFICATE-----",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, UsageError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        UsageError::new(format!(
            "{key} {}: cannot read a private key: {e}; give a readable, unencrypted PEM key file",
            path.display()
        ))
    })
}

/// A server configuration from a certificate chain and key file (`mock-api --tls-cert`).
pub fn server_config(
    cert: &Path,
    key: &Path,
    keys: (&str, &str),
) -> Result<rustls::ServerConfig, UsageError> {
    let chain = read_certs(keys.0, cert)?;
    let private = read_key(keys.1, key)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
        .map_err(|e| {
            UsageError::new(format!(
                "{} {} and {} {} do not make a server certificate: {e}",
                keys.0,
                cert.display(),
                keys.1,
                key.display()
            ))
        })
}

/// What a failed handshake means, when a rustls error is among the causes: the sentence a
/// user can act on. `None` when TLS is not the cause.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    // An `io::Error` hides the error it wraps from `source()` (it returns that error's
    // source instead), and libraries wrap io errors in io errors: look inside each one.
    let mut todo = vec![err];
    while let Some(e) = todo.pop() {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            todo.push(inner);
        }
        if let Some(next) = e.source() {
            todo.push(next);
        }
    }
    None
}

/// As [`explain`], for a library that keeps only the text of the rustls error (fred,
/// pgwire-replication): the certificate error's name is in it. `None` when it is not.
pub fn explain_text(text: &str) -> Option<String> {
    use CertificateError as C;
    let known = [
        ("UnknownIssuer", C::UnknownIssuer),
        ("NotValidForName", C::NotValidForName),
        ("Expired", C::Expired),
        ("NotValidYet", C::NotValidYet),
    ];
    known
        .into_iter()
        .find(|(name, _)| text.contains(name))
        .map(|(_, e)| describe(&rustls::Error::InvalidCertificate(e)))
}

fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "TLS: the server's certificate is signed by an unknown authority; give the CA that signed it (ca_file, or sslrootcert for Postgres)".into()
        }
        E::InvalidCertificate(CertificateError::NotValidForName)
        | E::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "TLS: the server's certificate does not name the host connected to (hostname mismatch); connect by a name the certificate lists".into()
        }
        E::InvalidCertificate(CertificateError::Expired)
        | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "TLS: the server's certificate has expired; renew it on the server".into()
        }
        E::InvalidCertificate(CertificateError::NotValidYet)
        | E::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "TLS: the server's certificate is not valid yet; check the clocks".into()
        }
        E::InvalidCertificate(other) => format!("TLS: the server's certificate is refused: {other:?}"),
        E::AlertReceived(alert) => format!(
            "TLS: the server refused the handshake ({alert:?}); does it require a client certificate (cert_file, key_file)?"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Verification short of [`Verify::Full`]: the chain only, or nothing. Signatures of the
/// handshake are always checked.
#[derive(Debug)]
struct Lenient {
    /// The chain's verifier; `None`: the certificate is not checked.
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
