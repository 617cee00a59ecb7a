//! The binary: exit codes (0 ok, 1 error, 2 bad usage) and one-line errors on stderr.

use std::process::{Command, Output};

fn plugin(args: &[&str], kubeconfig: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubectl-fathom"));
    cmd.args(args);
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    cmd.env_remove("FATHOM_COLLECTOR");
    cmd.output().expect("runs kubectl-fathom")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_usage_exits_2() {
    let o = plugin(&[], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = plugin(&["top"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = plugin(&["run", "-f", "/nonexistent/job.yaml"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("error: /nonexistent/job.yaml"),
        "{}",
        stderr(&o)
    );
    let o = plugin(&["--help"], None);
    assert_eq!(o.status.code(), Some(0));
    for sub in ["get", "top", "hist", "flamegraph", "tail", "run", "explain"] {
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(sub),
            "{sub} in --help"
        );
    }
}

#[test]
fn an_unreachable_api_server_exits_1_with_one_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dir = std::env::temp_dir().join(format!("kubectl-fathom-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{ server: 'http://127.0.0.1:{port}' }}\nusers:\n- name: u\n  user: {{ token: t0k }}\ncontexts:\n- name: x\n  context: {{ cluster: c, user: u, namespace: demo }}\ncurrent-context: x\n"
        ),
    )
    .expect("kubeconfig");
    let o = plugin(&["get", "web"], Some(&kubeconfig));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with("error: cannot reach the Kubernetes API server:"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // tail: the token comes from the kubeconfig, the operator is not there.
    let o = plugin(
        &[
            "tail",
            "web",
            "--collector",
            &format!("127.0.0.1:{port}"),
            "--insecure-plaintext",
        ],
        Some(&kubeconfig),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(&format!(
            "error: cannot reach the operator's Results API at 127.0.0.1:{port}"
        )),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
