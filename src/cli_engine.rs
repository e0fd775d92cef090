//! `nsmatrix vm engine`: boot a Docker engine inside a QEMU guest of a chosen kernel, print what
//! it reports, optionally run one container there, and tear it down. A debugging aid for the
//! engine guests of `backend::guest_docker::engine`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use clap::{Args, Subcommand};
use futures_util::StreamExt;

use crate::backend::guest_docker::engine::{self as guest_engine, EngineOptions, GuestEngine};
use crate::exit;

#[derive(Args, Debug, Clone)]
#[command(about = "Debugging aids around QEMU guests")]
pub struct VmArgs {
    #[command(subcommand)]
    pub action: VmAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum VmAction {
    Engine(EngineArgs),
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Boot a Docker engine in a QEMU guest of a kernel, show what it reports, tear it down",
    long_about = "Boots KERNEL (from `nsmatrix kernels list`) with Debian's docker.io, containerd \
                  and runc from the bookworm-engine root file system, waits until the engine \
                  answers through a port forwarded on 127.0.0.1 only, and prints its facts (kernel, \
                  security options, cgroup version, whether user namespaces exist). Images given \
                  with --image are loaded once into a cached data disk and used copy-on-write; \
                  nothing is pulled. --run starts one container there (network none) and prints \
                  its output. --keep waits for Ctrl-C, printing a DOCKER_HOST to use meanwhile.",
    after_help = "Examples:\n  nsmatrix vm engine --kernel debian-6.1 --bare-boot\n  nsmatrix vm engine --kernel synology-like-5.10 --image bookworm --run bookworm -- bwrap --version\n  nsmatrix vm engine --kernel synology-like-5.10 --image bookworm --image bookworm-suid --codex 0.171.0 --keep"
)]
pub struct EngineArgs {
    /// A kernel of the catalog (`nsmatrix kernels list`), fetched or built if not cached.
    #[arg(long, default_value = "debian-6.1")]
    pub kernel: String,
    /// A sysctl set in the guest before dockerd starts (NAME=VALUE, repeatable).
    #[arg(long = "sysctl", value_name = "NAME=VALUE")]
    pub sysctls: Vec<String>,
    /// A catalog image (built on the host if needed) or a reference in the host's engine, to
    /// have in the guest's engine (repeatable).
    #[arg(long = "image", value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Attach this Codex package version read-only at /opt/codex in the guest.
    #[arg(long)]
    pub codex: Option<String>,
    /// First time a bare boot of the same kernel (init, then power off).
    #[arg(long)]
    pub bare_boot: bool,
    /// Run one container of IMAGE with the command after `--`.
    #[arg(long, value_name = "IMAGE")]
    pub run: Option<String>,
    /// The container's user (`--run`), e.g. 1000 or 0.
    #[arg(long)]
    pub user: Option<String>,
    /// Capabilities to add to the container (`--run`), e.g. SYS_ADMIN.
    #[arg(long = "cap-add")]
    pub cap_add: Vec<String>,
    /// Security options of the container (`--run`), e.g. seccomp=unconfined.
    #[arg(long = "security-opt")]
    pub security_opt: Vec<String>,
    /// Expose the kernel's AppArmor to the engine (securityfs and apparmor_parser from
    /// bookworm's apparmor package), as a Debian or Ubuntu Docker host does: dockerd then
    /// confines containers with its docker-default profile unless --security-opt
    /// apparmor=unconfined.
    #[arg(long)]
    pub apparmor: bool,
    /// Mount the Codex disk into the container at /opt/codex (read-only; needs --codex).
    #[arg(long)]
    pub mount_codex: bool,
    /// Keep the engine until Ctrl-C (prints DOCKER_HOST).
    #[arg(long)]
    pub keep: bool,
    #[arg(long, default_value_t = 1536)]
    pub memory_mb: u32,
    /// The command for --run.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn vm(a: VmArgs) -> u8 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match a.action {
        VmAction::Engine(e) => match rt.block_on(engine(e)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("nsmatrix vm engine: {e:#}");
                exit::ERRORS
            }
        },
    }
}

fn parse_sysctls(list: &[String]) -> Result<BTreeMap<String, String>> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| {
                    anyhow!("--sysctl {s:?}: give NAME=VALUE, e.g. user.max_user_namespaces=0")
                })
        })
        .collect()
}

async fn engine(a: EngineArgs) -> Result<u8> {
    let mut opts = EngineOptions::new(&a.kernel);
    opts.sysctls = parse_sysctls(&a.sysctls)?;
    opts.codex = a.codex.clone();
    opts.apparmor = a.apparmor;
    opts.memory_mb = a.memory_mb;
    if a.mount_codex && a.codex.is_none() {
        bail!("--mount-codex needs --codex VERSION");
    }
    if a.bare_boot {
        let t = guest_engine::bare_boot(&a.kernel).await?;
        println!(
            "bare boot: {:.2} s (QEMU start to power-off)",
            t.as_secs_f64()
        );
    }
    let mut refs = Vec::new();
    if !a.images.is_empty() {
        let host = crate::backend::docker::connect()
            .await
            .map_err(|u| anyhow!("{u}"))?;
        for i in &a.images {
            refs.push(host.ensure_image(i).await?);
        }
        let t = Instant::now();
        let (g, info) = guest_engine::data::start_with_images(opts, &refs).await?;
        println!(
            "data disk: {} images (prepared once in {:.1} s: boot {:.1} s, load {:.1} s); this start {:.1} s",
            info.images.len(),
            info.total_s,
            info.boot_s,
            info.load_s,
            t.elapsed().as_secs_f64()
        );
        return finish(&a, g, &refs).await;
    }
    let g = guest_engine::start_guest_engine(&opts).await?;
    finish(&a, g, &refs).await
}

async fn finish(a: &EngineArgs, g: GuestEngine, refs: &[String]) -> Result<u8> {
    let result = report_and_run(a, &g, refs).await;
    if a.keep && result.is_ok() {
        println!("DOCKER_HOST={} (Ctrl-C to tear down)", g.endpoint);
        let _ = tokio::signal::ctrl_c().await;
    }
    let t = Instant::now();
    let run_dir = g.run_dir.clone();
    g.shutdown().await?;
    println!(
        "teardown: {:.2} s; run directory removed: {}",
        t.elapsed().as_secs_f64(),
        !run_dir.exists()
    );
    result
}

async fn report_and_run(a: &EngineArgs, g: &GuestEngine, refs: &[String]) -> Result<u8> {
    let info = g.docker.info().await.context("docker info in the guest")?;
    let ver = g
        .docker
        .version()
        .await
        .context("docker version in the guest")?;
    println!("endpoint: {} ({})", g.endpoint, g.accel.as_str());
    println!(
        "kernel: {} ({}), CONFIG_USER_NS={}; in the guest: unshare(CLONE_NEWUSER) as root: {}",
        g.kernel.name,
        info.kernel_version.clone().unwrap_or_default(),
        if g.kernel.user_ns { "y" } else { "n" },
        g.userns_probe
    );
    println!(
        "engine: docker {} (API {}), {} / {}, storage {}, cgroup {} ({}), security options: {}",
        ver.version.unwrap_or_default(),
        ver.api_version.unwrap_or_default(),
        info.operating_system.unwrap_or_default(),
        info.architecture.unwrap_or_default(),
        info.driver.unwrap_or_default(),
        info.cgroup_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
        info.cgroup_driver
            .map(|v| v.to_string())
            .unwrap_or_default(),
        info.security_options.unwrap_or_default().join(", ")
    );
    let ms =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "timings from QEMU start: init {}, dockerd started {}, engine ready {:.2} s",
        ms(g.timings.init),
        ms(g.timings.dockerd_started),
        g.timings.ready.as_secs_f64()
    );
    let Some(image) = &a.run else {
        return Ok(exit::OK);
    };
    let reference = a
        .images
        .iter()
        .position(|i| i == image)
        .map(|i| refs[i].clone())
        .unwrap_or_else(|| image.clone());
    let mut binds = Vec::new();
    if a.mount_codex {
        binds.push(format!(
            "{0}:{0}:ro",
            crate::backend::guest_docker::engine::GUEST_CODEX_DIR
        ));
    }
    let body = ContainerCreateBody {
        image: Some(reference.clone()),
        cmd: Some(a.command.clone()),
        user: a.user.clone(),
        working_dir: Some("/tmp".into()),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            cap_add: (!a.cap_add.is_empty()).then(|| a.cap_add.clone()),
            security_opt: (!a.security_opt.is_empty()).then(|| a.security_opt.clone()),
            binds: (!binds.is_empty()).then_some(binds),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let id = g
        .docker
        .create_container(Some(CreateContainerOptionsBuilder::default().build()), body)
        .await
        .with_context(|| format!("create a container of {reference} in the guest"))?
        .id;
    let created = t.elapsed();
    g.docker
        .start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .context("start the container")?;
    let mut wait = g
        .docker
        .wait_container(&id, Some(WaitContainerOptionsBuilder::default().build()));
    let code = match wait.next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return Err(e).context("wait for the container"),
        None => -1,
    };
    let ran = t.elapsed();
    let mut logs = g.docker.logs(
        &id,
        Some(
            LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    while let Some(Ok(chunk)) = logs.next().await {
        print!("{chunk}");
    }
    g.docker
        .remove_container(
            &id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await
        .ok();
    println!(
        "container: exit {code}; created in {:.2} s, created to exited {:.2} s",
        created.as_secs_f64(),
        ran.as_secs_f64()
    );
    Ok(if code == 0 { exit::OK } else { exit::FAILURES })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_need_name_and_value() {
        let m = parse_sysctls(&["user.max_user_namespaces=0".into()]).unwrap();
        assert_eq!(m["user.max_user_namespaces"], "0");
        let e = parse_sysctls(&["kernel.x".into()]).unwrap_err().to_string();
        assert!(e.contains("NAME=VALUE"), "{e}");
    }
}
