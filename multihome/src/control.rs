//! The daemon's local control socket, for commands that act live:
//! `multihome uplink set-weight|drain|undrain`, `reload` and `explain`. One JSON request per line,
//! one JSON reply per line; requests reach the daemon's loop as
//! [`Command`]s, so the loop stays the only owner of state.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use log::warn;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader as TokioBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

const RUN_DIR: &str = "/run/multihome";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    SetWeight {
        uplink: String,
        weight: u32,
    },
    Drain {
        uplink: String,
        /// Also end its flows: TCP reset, the rest moved.
        #[serde(default)]
        reset: bool,
    },
    Undrain {
        uplink: String,
    },
    /// Re-read the config, as SIGHUP does, and say how it went.
    Reload,
    /// Why a new flow would go where it goes (the reply is JSON).
    Explain(crate::policy::explain::Query),
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    message: String,
}

/// A request with the way back to its client.
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// The socket of the daemon that uses `pin_dir`.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    Path::new(RUN_DIR).join(format!("{name}.sock"))
}

/// Listens on the socket for `pin_dir` and forwards requests to `tx`.
pub fn listen(pin_dir: &Path, tx: mpsc::Sender<Command>) -> anyhow::Result<PathBuf> {
    let path = socket_path(pin_dir);
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    if UnixStream::connect(&path).is_ok() {
        bail!(
            "another multihome already serves {} ({}): stop it first",
            pin_dir.display(),
            path.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    // Whatever the umask: only the daemon's user may connect.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    let owner = unsafe { libc::geteuid() };
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            // SO_PEERCRED: a socket passed on by the owner still carries
            // its client's uid.
            match sock.peer_cred() {
                Ok(c) if c.uid() == owner || c.uid() == 0 => {}
                Ok(c) => {
                    warn!("control socket: refused a client of uid {}", c.uid());
                    continue;
                }
                Err(e) => {
                    warn!("control socket: no peer credentials: {e}");
                    continue;
                }
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = sock.into_split();
                let mut line = String::new();
                if TokioBufReader::new(read)
                    .read_line(&mut line)
                    .await
                    .is_err()
                {
                    return;
                }
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => ask(&tx, request).await,
                    Err(e) => Err(format!("bad request: {e}")),
                };
                let reply = match reply {
                    Ok(message) => Reply { ok: true, message },
                    Err(message) => Reply { ok: false, message },
                };
                let mut out = serde_json::to_string(&reply).unwrap_or_default();
                out.push('\n');
                if let Err(e) = write.write_all(out.as_bytes()).await {
                    warn!("control socket: {e}");
                }
            });
        }
    });
    Ok(path)
}

async fn ask(tx: &mpsc::Sender<Command>, request: Request) -> Result<String, String> {
    let (reply, answer) = oneshot::channel();
    tx.send(Command { request, reply })
        .await
        .map_err(|_| "the daemon is stopping".to_owned())?;
    answer
        .await
        .map_err(|_| "the daemon dropped the request".to_owned())?
}

/// Sends `request` to the daemon of `pin_dir` and returns its answer.
pub fn send(pin_dir: &Path, request: &Request) -> anyhow::Result<String> {
    let path = socket_path(pin_dir);
    let mut sock = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to {}: is `multihome run --pin-dir {}` running?",
            path.display(),
            pin_dir.display()
        )
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    sock.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(sock).read_line(&mut answer)?;
    let reply: Reply =
        serde_json::from_str(&answer).with_context(|| format!("unreadable answer {answer:?}"))?;
    if reply.ok {
        Ok(reply.message)
    } else {
        Err(anyhow!(reply.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each() {
        let r = Request::SetWeight {
            uplink: "x".into(),
            weight: 3,
        };
        let line = serde_json::to_string(&r).expect("json");
        assert_eq!(line, r#"{"cmd":"set-weight","uplink":"x","weight":3}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).expect("parse"), r);
    }

    #[test]
    fn each_pin_dir_has_its_own_socket() {
        assert_eq!(
            socket_path(Path::new("/sys/fs/bpf/multihome")),
            Path::new("/run/multihome/sys_fs_bpf_multihome.sock")
        );
    }
}
