//! The artifact cache: where downloads and builds live, and verified downloads into it.
//!
//! Everything fetched or built (Debian packages, kernels, images' root filesystems, npm
//! tarballs) is stored under [`cache_dir`], named by what it is and verified by content, so a
//! rerun is fast and a corrupted entry is detected and fetched again.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256, Sha512};

/// `$NSMATRIX_CACHE`, else `$XDG_CACHE_HOME/nsmatrix`, else `$HOME/.cache/nsmatrix`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NSMATRIX_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("nsmatrix");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("nsmatrix")
}

/// What a download must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// Lower-case hex SHA-256 (Debian `Packages` indexes).
    Sha256Hex(String),
    /// An npm/SRI integrity string: `sha512-<base64>`.
    Sri(String),
}

impl Checksum {
    /// Hash a file and compare.
    pub fn verify_file(&self, path: &Path) -> Result<bool> {
        let mut f =
            fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
        match self {
            Checksum::Sha256Hex(want) => {
                let mut h = Sha256::new();
                copy_into(&mut f, &mut h)?;
                Ok(hex::encode(h.finalize()) == want.to_ascii_lowercase())
            }
            Checksum::Sri(sri) => {
                use base64::Engine as _;
                let Some(b64) = sri.strip_prefix("sha512-") else {
                    bail!("unsupported integrity string {sri:?} (only sha512- is supported)");
                };
                let mut h = Sha512::new();
                copy_into(&mut f, &mut h)?;
                let got = base64::engine::general_purpose::STANDARD.encode(h.finalize());
                Ok(got == b64)
            }
        }
    }
}

fn copy_into(r: &mut impl Read, h: &mut impl Digest) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// Download `url` to `dest` unless a file that matches `sum` is already there. A file that
/// does not match (corrupted, truncated) is fetched again; a download that does not match is
/// an error and leaves nothing at `dest`.
pub fn fetch_verified(url: &str, dest: &Path, sum: &Checksum) -> Result<PathBuf> {
    // One download per file at a time (they share `dest`'s partial file), across processes
    // and threads: the others wait, then verify what it left.
    let _lock = lock(dest)?;
    if dest.exists() {
        if sum.verify_file(dest)? {
            return Ok(dest.to_path_buf());
        }
        eprintln!(
            "nsmatrix: cached {} does not match its checksum; fetching it again",
            dest.display()
        );
        fs::remove_file(dest).ok();
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let tmp = dest.with_extension("partial");
    download(url, &tmp)?;
    if !sum.verify_file(&tmp)? {
        fs::remove_file(&tmp).ok();
        bail!("download of {url} does not match its checksum {sum:?}");
    }
    fs::rename(&tmp, dest)
        .with_context(|| format!("failed to move download into {}", dest.display()))?;
    Ok(dest.to_path_buf())
}

/// The system's CA bundle on Debian and Ubuntu (ca-certificates).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// An HTTP agent that trusts the certificates in `$SSL_CERT_FILE`, else the system's CA
/// bundle (so a TLS-inspecting proxy whose CA the machine trusts works too), else the
/// built-in web PKI roots.
pub fn http_agent() -> Result<ureq::Agent> {
    let file = std::env::var_os("SSL_CERT_FILE")
        .filter(|f| !f.is_empty())
        .or_else(|| {
            Path::new(SYSTEM_CA_BUNDLE)
                .is_file()
                .then(|| SYSTEM_CA_BUNDLE.into())
        });
    let Some(file) = file else {
        return Ok(ureq::Agent::new_with_defaults());
    };
    let pem = fs::read(&file)
        .with_context(|| format!("failed to read {}", Path::new(&file).display()))?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build();
    Ok(ureq::Agent::config_builder().tls_config(tls).build().into())
}

/// Plain download to a file (no verification): for indexes whose checksum is checked by the
/// caller in another way.
pub fn download(url: &str, dest: &Path) -> Result<()> {
    let resp = http_agent()?
        .get(url)
        .call()
        .with_context(|| format!("failed to fetch {url}"))?;
    let mut body = resp.into_body().into_reader();
    let mut out =
        fs::File::create(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    io::copy(&mut body, &mut out).with_context(|| format!("failed to download {url}"))?;
    out.flush()?;
    Ok(())
}

/// Holds an exclusive `flock` on `<entry>.lock` until dropped.
pub struct Lock(#[allow(dead_code)] fs::File);

pub fn lock(entry: &Path) -> Result<Lock> {
    let parent = entry.parent().expect("cache entries have a parent");
    fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    let path = entry.with_extension("lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; blocks until the other builder is done.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("failed to lock {}", path.display()));
    }
    Ok(Lock(f))
}

/// [`lock`] for async code: the wait for the holder happens on a blocking thread. Waiting on a
/// runtime's worker instead would stall the tasks queued there, and the holder may be one of
/// them (a second engine guest of one run waited so for the first one's data disk, which was
/// never finished: the run hung).
pub async fn lock_async(entry: &Path) -> Result<Lock> {
    let entry = entry.to_path_buf();
    tokio::task::spawn_blocking(move || lock(&entry))
        .await
        .context("the task waiting for a cache lock panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two holders of one entry's lock, even threads of one process, take turns: the second
    /// gets it only after the first let go.
    #[test]
    fn an_entry_lock_is_held_by_one_at_a_time() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = tempfile::tempdir().unwrap();
        let entry = d.path().join("kernel-key");
        let first = lock(&entry).unwrap();
        let released = std::sync::Arc::new(AtomicBool::new(false));
        let waiter = {
            let (entry, released) = (entry.clone(), released.clone());
            std::thread::spawn(move || {
                let _second = lock(&entry).unwrap();
                released.load(Ordering::SeqCst)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        released.store(true, Ordering::SeqCst);
        drop(first);
        assert!(
            waiter.join().unwrap(),
            "the second holder got the lock while the first held it"
        );
    }

    /// Two tasks on a one-thread runtime: the second waits for the lock while the first, which
    /// holds it, still has work to await. A wait that blocked the runtime's thread would never
    /// end; the test gives it 10 s.
    #[test]
    fn an_async_lock_waits_without_stalling_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let entry = d.path().join("data-key");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let order = rt.block_on(async move {
                let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                let first = lock_async(&entry).await.unwrap();
                let holder = {
                    let order = order.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        order.lock().unwrap().push("holder done");
                        drop(first);
                    })
                };
                let waiter = {
                    let (order, entry) = (order.clone(), entry.clone());
                    tokio::spawn(async move {
                        let _second = lock_async(&entry).await.unwrap();
                        order.lock().unwrap().push("waiter locked");
                    })
                };
                holder.await.unwrap();
                waiter.await.unwrap();
                order.lock().unwrap().clone()
            });
            done_tx.send(order).ok();
        });
        let order = done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the waiting task stalled the task that held the lock");
        assert_eq!(order, vec!["holder done", "waiter locked"]);
    }

    #[test]
    fn checksums_detect_corruption() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"hello").unwrap();
        let good = Checksum::Sha256Hex(
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
        );
        assert!(good.verify_file(&p).unwrap());
        fs::write(&p, b"hellp").unwrap();
        assert!(!good.verify_file(&p).unwrap());
        // sha512("hello") in SRI form
        fs::write(&p, b"hello").unwrap();
        let sri = Checksum::Sri("sha512-m3HSJL1i83hdltRq0+o9czGb+8KJDKra4t/3JRlnPKcjI8PZm6XBHXx6zG4UuMXaDEZjR1wuXDre9G9zvN7AQw==".into());
        assert!(sri.verify_file(&p).unwrap());
    }
}
