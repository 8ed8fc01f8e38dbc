//! kdbt writing into a pipe whose reader is gone (`kdbt stats | grep -q …`) ends as cat
//! or ls do, by SIGPIPE, with nothing on stderr: not a panic in println!.
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn a_closed_pipe_ends_kdbt_quietly() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe() fills the two descriptors, each then owned by one File.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (reader, writer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    drop(reader);
    // `--help` prints without the module; its output goes to the closed pipe.
    let out = Command::new(env!("CARGO_BIN_EXE_kdbt"))
        .arg("--help")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run kdbt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "kdbt panicked: {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "status {:?}, stderr {stderr}", out.status);
}
