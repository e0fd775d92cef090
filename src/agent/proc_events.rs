//! The kernel's process events (the proc connector, `NETLINK_CONNECTOR` / `CN_IDX_PROC`): a
//! message for every fork and exec on the machine, as it happens.
//!
//! A Codex cell must see every bwrap Codex starts, and a bwrap that fails lives a few
//! milliseconds. Walking Codex's process tree in /proc every 2 ms catches most of them, but
//! under TCG a walk costs about as much CPU as it waits: measured in a one-vCPU debian-6.1
//! guest, the walks took 0.9 s of a 2.1 s cell. With process events the agent is woken by each
//! exec in Codex's tree and looks at that process at once, and walks the tree only now and
//! then. The events need `CAP_NET_ADMIN` in the initial namespaces (a guest's agent, the host
//! as root); elsewhere (a container) [`ProcEvents::open`] fails and the agent walks every 2 ms
//! as before.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;
const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct cn_msg` without its data.
const CN_MSG: usize = 20;
/// `struct proc_event` up to its `event_data` union.
const EV_HDR: usize = 16;

/// One process event that matters to a watcher of a process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new task: a process when `child_pid == child_tgid`, else a thread.
    Fork { parent_tgid: u32, child_tgid: u32 },
    /// A process replaced its program (after the exec succeeded: /proc shows the new one).
    Exec { tgid: u32 },
}

/// The events were not all delivered (the socket's buffer overflowed): a watcher must fall
/// back to looking at /proc itself.
#[derive(Debug)]
pub struct Overrun;

pub struct ProcEvents {
    fd: OwnedFd,
}

impl ProcEvents {
    /// Subscribe, and wait (up to `ack_within`) for the kernel's acknowledgement. Inside a
    /// container the kernel neither delivers events nor acknowledges, so no answer is an
    /// error too.
    pub fn open(ack_within: Duration) -> io::Result<Self> {
        // SAFETY: plain socket calls on a descriptor owned here.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let big: libc::c_int = 4 << 20;
        // Best effort: a bigger buffer only makes an overrun rarer.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &big as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = CN_IDX_PROC;
        let rc = unsafe {
            libc::bind(
                raw,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let events = ProcEvents { fd };
        events.send_op(PROC_CN_MCAST_LISTEN)?;
        let deadline = Instant::now() + ack_within;
        let mut buf = vec![0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not acknowledge the subscription to process events",
                ));
            }
            if !events.wait_readable(left) {
                continue;
            }
            let n = match events.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            for ev in messages(&buf[..n]) {
                if ev.what == PROC_EVENT_NONE {
                    return match ev.word(0) {
                        Some(0) => Ok(events),
                        Some(err) => Err(io::Error::from_raw_os_error(err as i32)),
                        None => Err(io::Error::other("a short acknowledgement")),
                    };
                }
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Hand every event waiting on the socket to `f`, without blocking.
    pub fn drain(&mut self, mut f: impl FnMut(Event)) -> Result<(), Overrun> {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = match self.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ENOBUFS: events were dropped.
                Err(_) => return Err(Overrun),
            };
            for ev in messages(&buf[..n]) {
                match ev.what {
                    PROC_EVENT_FORK => {
                        if let (Some(parent_tgid), Some(child_tgid)) = (ev.word(1), ev.word(3)) {
                            f(Event::Fork {
                                parent_tgid,
                                child_tgid,
                            });
                        }
                    }
                    PROC_EVENT_EXEC => {
                        if let Some(tgid) = ev.word(1) {
                            f(Event::Exec { tgid });
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        byte_count(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
    }

    fn wait_readable(&self, within: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = within.as_millis().clamp(1, 1000) as libc::c_int;
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    fn send_op(&self, op: u32) -> io::Result<()> {
        let msg = op_message(op);
        let fd = self.fd.as_raw_fd();
        byte_count(unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) }).map(|_| ())
    }
}

impl Drop for ProcEvents {
    /// Unsubscribe: the kernel counts listeners and builds events while any is left.
    fn drop(&mut self) {
        let _ = self.send_op(PROC_CN_MCAST_IGNORE);
    }
}

/// A byte count from `send`/`recv`, or the error it stands for.
fn byte_count(n: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The netlink message that asks the proc connector to start (`LISTEN`) or stop (`IGNORE`).
fn op_message(op: u32) -> Vec<u8> {
    let len = NLMSG_HDR + CN_MSG + 4;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it in
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // ack
    m.extend_from_slice(&4u16.to_ne_bytes()); // data length
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&op.to_ne_bytes());
    m
}

/// A `struct proc_event` found in a datagram: its kind and its `event_data` bytes.
struct RawEvent<'a> {
    what: u32,
    data: &'a [u8],
}

impl RawEvent<'_> {
    /// The `i`th 32-bit word of `event_data`.
    fn word(&self, i: usize) -> Option<u32> {
        let b = self.data.get(i * 4..i * 4 + 4)?;
        Some(u32::from_ne_bytes(b.try_into().ok()?))
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The proc events in one datagram (a datagram may carry several netlink messages; anything
/// malformed ends the walk).
fn messages(buf: &[u8]) -> Vec<RawEvent<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let Some(len) = u32_at(buf, at).map(|l| l as usize) else {
            break;
        };
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        let msg = &buf[at + NLMSG_HDR..at + len];
        if let Some(data_len) = msg
            .get(16..18)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]) as usize)
            && let Some(data) = msg.get(CN_MSG..CN_MSG + data_len)
            && let Some(what) = u32_at(data, 0)
            && data.len() >= EV_HDR
        {
            out.push(RawEvent {
                what,
                data: &data[EV_HDR..],
            });
        }
        at += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram as the kernel writes it: one netlink message holding one proc event.
    fn datagram(what: u32, words: &[u32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&0u32.to_ne_bytes()); // cpu
        ev.extend_from_slice(&0u64.to_ne_bytes()); // timestamp
        for w in words {
            ev.extend_from_slice(&w.to_ne_bytes());
        }
        let mut m = op_message(0);
        m.truncate(NLMSG_HDR + 16);
        m.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&ev);
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn parses_fork_and_exec_events_and_stops_at_a_truncated_message() {
        let mut buf = datagram(PROC_EVENT_FORK, &[10, 10, 11, 11]);
        buf.extend(datagram(PROC_EVENT_EXEC, &[11, 11]));
        let evs = messages(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(
            (evs[0].what, evs[0].word(1), evs[0].word(3)),
            (1, Some(10), Some(11))
        );
        assert_eq!((evs[1].what, evs[1].word(1)), (2, Some(11)));
        assert_eq!(evs[1].word(2), None);
        let cut = &buf[..buf.len() - 3];
        assert_eq!(messages(cut).len(), 1);
    }

    #[test]
    fn the_subscription_message_is_what_the_kernel_expects() {
        let m = op_message(PROC_CN_MCAST_LISTEN);
        assert_eq!(m.len(), 40);
        assert_eq!(u32_at(&m, 0), Some(40));
        assert_eq!(u32_at(&m, NLMSG_HDR), Some(CN_IDX_PROC));
        assert_eq!(u32_at(&m, NLMSG_HDR + 4), Some(CN_VAL_PROC));
        assert_eq!(u32_at(&m, NLMSG_HDR + CN_MSG), Some(PROC_CN_MCAST_LISTEN));
    }

    /// On a machine where this test runs as root in the initial namespaces, a real child's
    /// fork and exec arrive as events. Elsewhere the subscription is refused, and says so.
    #[test]
    fn a_real_child_is_seen_forking_and_execing() {
        // Pid 2 is kthreadd only in the initial pid namespace, and kthreadd lives in the
        // initial user and network namespaces.
        let kthreadd =
            std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
        let initial = |ns: &str| {
            let own = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
            own.is_some() && own == std::fs::read_link(format!("/proc/2/ns/{ns}")).ok()
        };
        let root_in_initial_namespaces =
            unsafe { libc::geteuid() } == 0 && kthreadd && initial("net") && initial("user");
        let mut events = match ProcEvents::open(Duration::from_millis(500)) {
            Ok(e) => e,
            Err(e) => {
                assert!(
                    !root_in_initial_namespaces,
                    "root in the initial namespaces, yet process events are refused: {e}"
                );
                eprintln!("SKIP: process events need root in the initial namespaces; here: {e}");
                return;
            }
        };
        let child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let me = std::process::id();
        let (mut forked, mut execed) = (false, false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(forked && execed) && Instant::now() < deadline {
            events.wait_readable(Duration::from_millis(50));
            events
                .drain(|ev| match ev {
                    Event::Fork {
                        parent_tgid,
                        child_tgid,
                    } if parent_tgid == me && child_tgid == pid => forked = true,
                    Event::Exec { tgid } if tgid == pid => execed = true,
                    _ => {}
                })
                .unwrap();
        }
        let mut child = child;
        child.wait().unwrap();
        assert!(forked, "no fork event for child {pid} of {me}");
        assert!(execed, "no exec event for child {pid}");
    }
}
