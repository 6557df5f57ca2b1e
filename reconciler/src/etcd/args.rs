//! The command-line options that name the fleet's etcd and how to reach it, shared by
//! every command that talks to etcd.

use std::path::PathBuf;
use std::time::Duration;

use super::{EtcdAuth, EtcdConfig, EtcdTls, LeaseTimeouts};

/// How to reach the fleet's etcd.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// The fleet's etcd: client URLs, comma-separated (`https://` for TLS).
    #[arg(long = "etcd", value_name = "URL[,URL...]", env = "BERTH_ETCD")]
    pub endpoints: Option<String>,
    /// The key prefix berth's keys live under.
    #[arg(long = "etcd-prefix", value_name = "PREFIX", default_value = "/berth/")]
    pub prefix: String,
    /// The CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long = "etcd-cacert", value_name = "FILE", env = "BERTH_ETCD_CACERT")]
    pub ca: Option<PathBuf>,
    /// This host's client certificate (PEM), for etcd's client-certificate auth.
    #[arg(
        long = "etcd-cert",
        value_name = "FILE",
        env = "BERTH_ETCD_CERT",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long = "etcd-key",
        value_name = "FILE",
        env = "BERTH_ETCD_KEY",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,
    /// The etcd user, when etcd has authentication enabled.
    #[arg(
        long = "etcd-user",
        value_name = "NAME",
        env = "BERTH_ETCD_USER",
        requires = "password"
    )]
    pub user: Option<String>,
    /// The etcd user's password (better from the environment than the command line).
    #[arg(
        long = "etcd-password",
        value_name = "PASSWORD",
        env = "BERTH_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
    /// How long one etcd request may take, in milliseconds.
    #[arg(long = "etcd-timeout-ms", value_name = "MS", default_value_t = 2000)]
    pub request_timeout_ms: u64,
}

/// The host lease's timeouts (for `berth serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// The host lease's TTL, in seconds: a dead host's guests may be restarted
    /// elsewhere this long after its last renewal.
    #[arg(long = "lease-ttl", value_name = "SECONDS", default_value_t = 10)]
    pub lease_ttl: u64,
    /// How long after its last lease renewal a host must have stopped its HA guests,
    /// in milliseconds; at least 1 s shorter than the TTL.
    #[arg(long = "self-fence-ms", value_name = "MS", default_value_t = 6000)]
    pub self_fence_ms: u64,
}

impl LeaseArgs {
    /// The timeouts (checked when a connection is made).
    pub fn timeouts(&self) -> LeaseTimeouts {
        let self_fence_after = Duration::from_millis(self.self_fence_ms);
        LeaseTimeouts {
            ttl: Duration::from_secs(self.lease_ttl),
            // At least four renewals before the self-fence is due.
            renew_every: (self_fence_after / 4).min(LeaseTimeouts::default().renew_every),
            self_fence_after,
        }
    }
}

/// The options name no etcd.
#[derive(Debug, thiserror::Error)]
#[error("no etcd given: pass --etcd URL[,URL...] (or set BERTH_ETCD)")]
pub struct NoEtcd;

impl EtcdArgs {
    /// The settings, when `--etcd` was given (with the default lease timeouts).
    pub fn config(&self) -> Result<EtcdConfig, NoEtcd> {
        let endpoints = self.endpoints.as_deref().ok_or(NoEtcd)?;
        let mut config = EtcdConfig::new(endpoints);
        config.prefix = self.prefix.clone();
        if !config.prefix.ends_with('/') {
            config.prefix.push('/');
        }
        if self.ca.is_some() || self.cert.is_some() {
            config.tls = Some(EtcdTls {
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
                domain: None,
            });
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            config.auth = Some(EtcdAuth {
                user: user.clone(),
                password: password.clone(),
            });
        }
        config.request_timeout = Duration::from_millis(self.request_timeout_ms);
        Ok(config)
    }
}
