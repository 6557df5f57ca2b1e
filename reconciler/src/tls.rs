//! Mutual TLS between berth hosts (rustls on ring, TLS 1.3 only).
//!
//! The fleet has one CA. Each host holds a certificate of that CA whose subject
//! alternative name (a DNS name) is its Host name as the manifests spell it (`kvm01`);
//! the same certificate serves the host's API and authenticates the host when it calls
//! another host's API, so it carries both the `serverAuth` and `clientAuth` extended key
//! usages. The common name is set to the Host name too, for people, but is never
//! checked: only the SAN counts (as in every current TLS stack, webpki included).
//!
//! - [`FleetTls::load`] reads the CA, the certificate and the key from PEM files (under
//!   systemd: `LoadCredential=`, `$CREDENTIALS_DIRECTORY`), and checks that the
//!   certificate names this host.
//! - [`TlsListener`] serves the API: the handshake asks for a client certificate but
//!   does not require one (`/status`, `/metrics`, `/healthz` and the signed webhook
//!   stay reachable without one), refuses a certificate that does not chain to the
//!   fleet CA, and hands each connection's certificate ([`Connection`]) to the routes;
//!   the peer routes then require one that names a Host of the manifests
//!   ([`ClientCertificate::host_among`]).
//! - [`ClientTls`] connects to another host's API, presenting this host's certificate,
//!   and accepts only a server certificate of the fleet CA that names the Host it meant
//!   to reach: an answer from anyone else never reaches the code that acts on it.
//! - [`FleetCa`] makes a fleet CA and host certificates (`berth certs`, and tests).
//!
//! Nothing here is specific to the host API: the etcd client can take the same
//! [`FleetTls`] (its `client_config`) once the fleet runs on etcd.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tracing::warn;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;

/// The certificate files, as `berth serve` and `berth status` take them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The fleet CA certificate (PEM). Servers and clients are accepted only with a
    /// certificate it issued. Under systemd: `%d/ca.pem` (`LoadCredential=`).
    #[arg(long, env = "BERTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM, the chain up to the CA), issued by the fleet CA
    /// and naming the host (SAN DNS name = Host name); `berth certs` makes one.
    #[arg(long, env = "BERTH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM, PKCS#8, SEC1 or PKCS#1); keep it mode 0600.
    #[arg(long, env = "BERTH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds no usable item.
    #[error("cannot read {what} from {path}: {detail}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A required file was not given.
    #[error("{0}")]
    Missing(String),
    /// The certificate does not name the host it is used for.
    #[error("the certificate {path} does not name host {host} (it needs a DNS subject alternative name {host}; `berth certs` makes one)")]
    WrongName {
        /// The certificate file.
        path: String,
        /// The host.
        host: String,
    },
    /// rustls refused the material (a key that does not match the certificate, a CA
    /// that is not a certificate...).
    #[error("TLS setup failed")]
    Rustls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Making a certificate failed.
    #[error("cannot make the certificate for {what}")]
    Generate {
        /// The CA or the host.
        what: String,
        /// The error.
        #[source]
        source: rcgen::Error,
    },
}

fn file_error(what: &'static str, path: &Path, detail: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The fleet's TLS material as one host (or one `berth status`) holds it.
#[derive(Debug, Clone)]
pub struct FleetTls {
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
}

/// A certificate chain and its key.
#[derive(Debug)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl FleetTls {
    /// Reads the files of `args`. The CA is required; the certificate and key come
    /// together or not at all (a `berth status` may go without).
    ///
    /// # Errors
    /// When a file is missing, unreadable or not what it should be.
    pub fn load(args: &TlsArgs) -> Result<FleetTls, TlsError> {
        let ca = args
            .tls_ca
            .as_deref()
            .ok_or_else(|| TlsError::Missing("no fleet CA certificate (--tls-ca)".to_owned()))?;
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(ca, "the fleet CA certificate")? {
            roots
                .add(cert)
                .map_err(|e| file_error("the fleet CA certificate", ca, e))?;
        }
        let identity = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(Identity {
                chain: read_certificates(cert, "a certificate")?,
                key: PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| file_error("a private key", key, e))?,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(TlsError::Missing(
                    "--tls-cert needs its key (--tls-key)".to_owned(),
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError::Missing(
                    "--tls-key needs its certificate (--tls-cert)".to_owned(),
                ))
            }
        };
        let tls = FleetTls {
            roots: Arc::new(roots),
            identity,
        };
        // A key that does not match its certificate is found now, not at the first
        // connection.
        if tls.identity.is_some() {
            tls.client_config()?;
        }
        Ok(tls)
    }

    /// Like [`FleetTls::load`], for a host: the certificate and key are required and
    /// the certificate must name `host`.
    ///
    /// # Errors
    /// As [`FleetTls::load`], and when the certificate is missing or names another host.
    pub fn load_for_host(args: &TlsArgs, host: &str) -> Result<FleetTls, TlsError> {
        let tls = FleetTls::load(args)?;
        let Some(identity) = &tls.identity else {
            return Err(TlsError::Missing(
                "this host's certificate and key (--tls-cert, --tls-key)".to_owned(),
            ));
        };
        let names = identity
            .chain
            .first()
            .map(|leaf| ClientCertificate(Arc::new(leaf.clone())))
            .is_some_and(|leaf| leaf.names(host));
        if !names {
            return Err(TlsError::WrongName {
                path: args
                    .tls_cert
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                host: host.to_owned(),
            });
        }
        // The server side is checked now too.
        tls.server_config()?;
        Ok(tls)
    }

    /// The server side: this host's certificate; a client certificate is asked for,
    /// must chain to the fleet CA when given, and may be absent (the routes decide).
    ///
    /// # Errors
    /// When there is no certificate, or rustls refuses it.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let identity = self.identity.clone().ok_or_else(|| {
            TlsError::Missing("serving TLS needs a certificate (--tls-cert, --tls-key)".into())
        })?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(e.into()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.into()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain, identity.key)
            .map_err(|e| TlsError::Rustls(e.into()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side: servers must present a certificate of the fleet CA naming the
    /// host asked for; this host's certificate is presented when there is one.
    ///
    /// # Errors
    /// When rustls refuses the certificate or key.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.into()))?
            .with_root_certificates(Arc::clone(&self.roots));
        let mut config = match self.identity.clone() {
            Some(identity) => builder
                .with_client_auth_cert(identity.chain, identity.key)
                .map_err(|e| TlsError::Rustls(e.into()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client for other hosts' APIs.
    ///
    /// # Errors
    /// As [`FleetTls::client_config`].
    pub fn client(&self) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(self.client_config()?),
        })
    }
}

fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// The client certificate a connection presented (verified against the fleet CA
/// during the handshake).
#[derive(Clone)]
pub struct ClientCertificate(Arc<CertificateDer<'static>>);

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCertificate(..)")
    }
}

impl ClientCertificate {
    /// Whether the certificate names `host` (a DNS subject alternative name).
    pub fn names(&self, host: &str) -> bool {
        let Ok(name) = ServerName::try_from(host) else {
            return false;
        };
        webpki::EndEntityCert::try_from(&*self.0)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }

    /// The one host of `hosts` the certificate names; `None` when it names none, or
    /// more than one (ambiguous: the CA should never issue such a certificate).
    pub fn host_among<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        let mut named = hosts.into_iter().filter(|h| self.names(h));
        match (named.next(), named.next()) {
            (Some(host), None) => Some(host),
            _ => None,
        }
    }
}

/// What the API knows about a connection: where it comes from and the client
/// certificate it presented, if any.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Its certificate (already verified against the fleet CA), if it presented one.
    pub client: Option<ClientCertificate>,
}

/// The Host names of the enforced revision: whom the peer routes accept.
#[derive(Debug, Clone, Default)]
pub struct HostNames(Arc<RwLock<BTreeSet<String>>>);

impl HostNames {
    /// Replaces the names.
    pub fn set(&self, names: impl IntoIterator<Item = String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = names.into_iter().collect();
    }

    /// The Host `certificate` names, if it names exactly one of them.
    pub fn host_of(&self, certificate: &ClientCertificate) -> Option<String> {
        let names = self.0.read().unwrap_or_else(|e| e.into_inner());
        certificate
            .host_among(names.iter().map(String::as_str))
            .map(str::to_owned)
    }
}

/// A TCP listener whose connections are TLS: handshakes run concurrently (each with a
/// timeout) and only completed ones are handed to the HTTP server. A failed handshake
/// (plain HTTP, no TLS 1.3, a certificate of another CA) is logged and dropped.
pub struct TlsListener {
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, Connection)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS with `config` on `tcp`.
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let accepting = tokio::spawn(accept_loop(tcp, acceptor, tx));
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Closes the TCP listener too.
        self.accepting.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: mpsc::Sender<(tokio_rustls::server::TlsStream<TcpStream>, Connection)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, remote) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little, as axum does.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        if ready.is_closed() {
            return;
        }
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| ClientCertificate(Arc::new(leaf.clone().into_owned())));
                    let _ = ready.send((tls, Connection { remote, client })).await;
                }
                Ok(Err(e)) => warn!(%remote, error = %e, "TLS handshake refused"),
                Err(_) => warn!(%remote, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = Connection;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (it only does when this listener goes away).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Connection {
            remote: self.local,
            client: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for Connection
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Connects to other hosts' APIs over TLS (see the module documentation).
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

impl ClientTls {
    /// A TLS session over `stream` with the server that must be `name` (a Host name,
    /// or the DNS name or IP address in its certificate).
    ///
    /// # Errors
    /// When `name` is no valid name, or the handshake fails (a server certificate of
    /// another CA or for another name among the reasons).
    pub async fn connect(
        &self,
        stream: TcpStream,
        name: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(name.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is no DNS name or IP address to check a certificate against"),
            )
        })?;
        self.connector.connect(name, stream).await
    }
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A fleet CA that issues host certificates (`berth certs`; tests).
pub struct FleetCa {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetCa(..)")
    }
}

fn validity(params: &mut rcgen::CertificateParams, days: u32) {
    let now = SystemTime::now();
    // An hour of slack for clocks a little behind.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
}

impl FleetCa {
    /// A new CA (ECDSA P-256), valid for `days`, named `berth fleet CA (<name>)`.
    ///
    /// # Errors
    /// When rcgen fails.
    pub fn generate(name: &str, days: u32) -> Result<FleetCa, TlsError> {
        let fail = |source| TlsError::Generate {
            what: "the fleet CA".to_owned(),
            source,
        };
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("berth fleet CA ({name})"),
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days);
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(FleetCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// An existing CA, from its certificate and key (PEM).
    ///
    /// # Errors
    /// When either cannot be parsed.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<FleetCa, TlsError> {
        let fail = |source| TlsError::Generate {
            what: "the fleet CA".to_owned(),
            source,
        };
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(fail)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(cert_pem, key).map_err(fail)?;
        Ok(FleetCa {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate (PEM): what every host and client trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PEM): keep it off the hosts.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `name` (a Host name; or any other name, for tests), valid
    /// for `days`, for both server and client use; `ips` and `dns` are added as further
    /// subject alternative names (the address `berth status` may be pointed at).
    ///
    /// # Errors
    /// When a name is no valid DNS name, or rcgen fails.
    pub fn issue(
        &self,
        name: &str,
        ips: &[IpAddr],
        dns: &[String],
        days: u32,
    ) -> Result<Issued, TlsError> {
        let fail = |source| TlsError::Generate {
            what: name.to_owned(),
            source,
        };
        let mut names = vec![name.to_owned()];
        names.extend(dns.iter().filter(|d| *d != name).cloned());
        names.extend(ips.iter().map(IpAddr::to_string));
        let mut params = rcgen::CertificateParams::new(names).map_err(fail)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `text` to `path` with mode `mode` (created so, never readable by others
/// in between).
///
/// # Errors
/// When the file cannot be written.
pub fn write_file(path: &Path, text: &str, mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// A test fleet's files in one directory: `ca.pem`, and `<name>.pem`/`<name>.key` per
/// name. For tests of this crate and of the end-to-end tests.
#[derive(Debug)]
pub struct TestFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl TestFiles {
    /// Makes a CA and a certificate per name (SANs: the name and 127.0.0.1) in `dir`.
    ///
    /// # Panics
    /// When a certificate cannot be made or written (a test set-up failure).
    pub fn make(dir: &Path, names: &[&str]) -> TestFiles {
        let ca = FleetCa::generate("test", 2).expect("a CA");
        write_file(&dir.join("ca.pem"), ca.cert_pem(), 0o644).expect("write ca.pem");
        for name in names {
            let issued = ca
                .issue(name, &[IpAddr::from([127, 0, 0, 1])], &[], 2)
                .expect("a certificate");
            write_file(&dir.join(format!("{name}.pem")), &issued.cert_pem, 0o644)
                .expect("write cert");
            write_file(&dir.join(format!("{name}.key")), &issued.key_pem, 0o600)
                .expect("write key");
        }
        TestFiles {
            dir: dir.to_path_buf(),
        }
    }

    /// The arguments for `name`'s certificate (or the CA alone with `None`).
    pub fn args(&self, name: Option<&str>) -> TlsArgs {
        TlsArgs {
            tls_ca: Some(self.dir.join("ca.pem")),
            tls_cert: name.map(|n| self.dir.join(format!("{n}.pem"))),
            tls_key: name.map(|n| self.dir.join(format!("{n}.key"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_certificate_names_its_host_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TestFiles::make(dir.path(), &["kvm01", "kvm02"]);
        let tls = FleetTls::load_for_host(&files.args(Some("kvm01")), "kvm01").expect("loads");
        let leaf = ClientCertificate(Arc::new(
            tls.identity.as_ref().expect("identity").chain[0].clone(),
        ));
        assert!(leaf.names("kvm01"));
        assert!(!leaf.names("kvm02"));
        assert!(!leaf.names("kvm0"));
        assert_eq!(leaf.host_among(["kvm02", "kvm01"]), Some("kvm01"));
        assert_eq!(leaf.host_among(["kvm02", "kvm03"]), None);
        let hosts = HostNames::default();
        assert_eq!(hosts.host_of(&leaf), None, "no revision yet: no Host");
        hosts.set(["kvm01".to_owned(), "kvm02".to_owned()]);
        assert_eq!(hosts.host_of(&leaf).as_deref(), Some("kvm01"));

        let wrong = FleetTls::load_for_host(&files.args(Some("kvm02")), "kvm01");
        assert!(
            matches!(&wrong, Err(TlsError::WrongName { host, .. }) if host == "kvm01"),
            "{wrong:?}"
        );
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TestFiles::make(dir.path(), &["kvm01", "kvm02"]);
        let mut args = files.args(Some("kvm01"));
        args.tls_key = Some(dir.path().join("kvm02.key"));
        let mismatch = FleetTls::load(&args).expect_err("the key is kvm02's");
        assert!(matches!(mismatch, TlsError::Rustls(_)), "{mismatch}");

        std::fs::write(dir.path().join("empty.pem"), "not pem\n").expect("write");
        args.tls_ca = Some(dir.path().join("empty.pem"));
        let empty = FleetTls::load(&args)
            .expect_err("no certificate")
            .to_string();
        assert!(
            empty.contains("empty.pem") && empty.contains("no CERTIFICATE"),
            "{empty}"
        );
        args.tls_ca = Some(dir.path().join("missing.pem"));
        let missing = FleetTls::load(&args).expect_err("missing").to_string();
        assert!(missing.contains("missing.pem"), "{missing}");

        let mut args = files.args(Some("kvm01"));
        args.tls_key = None;
        assert!(matches!(
            FleetTls::load(&args),
            Err(TlsError::Missing(m)) if m.contains("--tls-key")
        ));
        assert!(matches!(
            FleetTls::load_for_host(&files.args(None), "kvm01"),
            Err(TlsError::Missing(_))
        ));
    }

    #[test]
    fn a_loaded_ca_issues_certificates_that_chain_to_it() {
        let ca = FleetCa::generate("fleet", 30).expect("ca");
        let again = FleetCa::load(ca.cert_pem(), &ca.key_pem()).expect("loads");
        let dir = tempfile::tempdir().expect("tempdir");
        let issued = again.issue("kvm03", &[], &[], 30).expect("issues");
        for (file, text) in [
            ("ca.pem", ca.cert_pem()),
            ("kvm03.pem", &issued.cert_pem),
            ("kvm03.key", &issued.key_pem),
        ] {
            std::fs::write(dir.path().join(file), text).expect("write");
        }
        // openssl, independently of rustls, agrees that it chains to the CA.
        let out = std::process::Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslclient",
                "kvm03.pem",
            ])
            .current_dir(dir.path())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let files = TestFiles {
            dir: dir.path().to_path_buf(),
        };
        FleetTls::load_for_host(&files.args(Some("kvm03")), "kvm03").expect("usable");
    }
}
