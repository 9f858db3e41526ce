//! `passwd FILE USER`: add, change or delete a user in a password file.

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::guard::passwords::{self, PasswordFile};

pub fn passwd(file: &Path, user: &str, stdin: bool, mosquitto: bool, force: bool, delete: bool) -> i32 {
    match passwd_inner(file, user, stdin, mosquitto, force, delete) {
        Ok(msg) => {
            eprintln!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("mqtt-uplink passwd: {e:#}");
            1
        }
    }
}

fn passwd_inner(
    file: &Path,
    user: &str,
    stdin: bool,
    mosquitto: bool,
    force: bool,
    delete: bool,
) -> anyhow::Result<String> {
    if user.is_empty() || user.contains(':') || user.contains(char::is_control) {
        anyhow::bail!("a username must be non-empty, without `:` or control characters");
    }
    let mut pf = if file.exists() {
        PasswordFile::load(file)?
    } else {
        PasswordFile::default()
    };
    if delete {
        if !pf.remove(user) {
            anyhow::bail!("no user `{user}` in {}", file.display());
        }
        write_file(file, &pf.render())?;
        return Ok(format!("removed `{user}` from {}{}", file.display(), RELOAD));
    }
    let password = if stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        let a = rpassword::prompt_password(format!("password for {user}: ")).map_err(no_terminal)?;
        let b = rpassword::prompt_password("again: ").map_err(no_terminal)?;
        if a != b {
            anyhow::bail!("the passwords differ");
        }
        a
    };
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    if let Err(weak) = passwords::check_strength(&password, user) {
        if !force {
            anyhow::bail!("weak password: {weak} (use --force to accept it anyway)");
        }
        eprintln!("warning: weak password accepted with --force: {weak}");
    }
    let hash = if mosquitto {
        passwords::hash_pbkdf2_sha512(password.as_bytes(), passwords::DEFAULT_PBKDF2_ITERATIONS)
    } else {
        passwords::hash_argon2id(password.as_bytes())
    };
    pf.set(user, hash)?;
    write_file(file, &pf.render())?;
    Ok(format!("set `{user}` in {}{}", file.display(), RELOAD))
}

/// After a change: a running appliance reads the file again only on reload.
const RELOAD: &str = "\nan appliance already running with this file uses it after a reload: \
                      `systemctl reload mqtt-uplink`, or `mqtt-uplink reload PID` (SIGHUP) outside systemd";

/// Prompting needs a terminal; without one (a script, a pipe, ssh without -t) say what to do instead.
fn no_terminal(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot prompt for the password: no terminal ({e}); pass it on standard input with \
         --password-stdin, e.g. `printf '%s\\n' \"$PASSWORD\" | mqtt-uplink passwd FILE USER --password-stdin`"
    )
}

/// Writes atomically (temp file + rename) with mode 0600. An existing file's owner and group are
/// kept (when allowed), so root editing the service's `/etc/mqtt-uplink/passwords` (owned by the
/// `mqtt-uplink` user) leaves it readable by the service.
fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let tmp = path.with_extension("tmp-mqtt-uplink");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        if let Ok(old) = std::fs::metadata(path) {
            // EPERM for a non-root caller changing the owner: the file then stays the caller's.
            let _ = std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()));
        }
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
