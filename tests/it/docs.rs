//! The README's examples, run as a reader would run them.

use cxone_offboard::sim::{SimOptions, spawn};

/// The `sh` block of a README section, with the simulator start line dropped (the test
/// starts one in-process) and its address replaced.
fn section_script(readme: &str, heading: &str, base: &str) -> (String, usize) {
    let mut script = String::from("set -eu\n");
    let mut curls = 0;
    let mut continued = false;
    for line in crate::helpers::sh_block(readme, heading).lines() {
        if line.trim_start().starts_with("cxone-offboard sim") {
            continue;
        }
        if !continued {
            curls += line.matches("curl ").count();
        }
        continued = line.ends_with('\\');
        script.push_str(&line.replace("http://127.0.0.1:8088", base));
        script.push('\n');
    }
    (script, curls)
}

#[tokio::test]
async fn the_readme_simulator_examples_work_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let sim = spawn(SimOptions::default(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("sim");
    let (script, curls) = section_script(&readme, "## Simulator", &sim.base_url());
    assert!(curls >= 3, "{script}");
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"external_id\":\"E000007\""), "{stdout}");
    assert!(stdout.contains("\"total\""), "{stdout}");
    let faults: serde_json::Value = reqwest::get(format!("{}/_sim/faults", sim.base_url()))
        .await
        .expect("sim")
        .json()
        .await
        .expect("json");
    assert!(
        faults.to_string().contains("E000009") && faults.to_string().contains("refuse"),
        "the fault example took effect: {faults}"
    );
    sim.shutdown().await;
}

#[test]
fn the_readme_starts_with_the_two_commands() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let first_block: Vec<&str> = readme
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a first sh block")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(first_block[0].starts_with("make demo"), "{first_block:?}");
    assert!(first_block[1].starts_with("make test"), "{first_block:?}");
    let makefile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Makefile"))
        .expect("Makefile");
    assert!(makefile.contains("\ndemo:") && makefile.contains("\ntest:"));
    let ci =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).expect(".ci/run");
    assert!(
        ci.contains("make test"),
        "CI runs the README's test command"
    );
}

#[tokio::test]
async fn the_demo_completes_every_saga_and_says_where_to_look() {
    let _shared = crate::helpers::BROKER.read().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cxone-offboard"))
        .args(["demo", "--users", "12", "--rate-limit", "400"])
        .env("OFFBOARD__S3__ENDPOINT", crate::helpers::s3_endpoint())
        .env("OFFBOARD__AMQP__URL", crate::helpers::amqp_url())
        .output()
        .await
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The status table (what `cxone-offboard status` shows), then the demo's own lines.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for want in [
        vec!["DELETED", "11"],
        vec!["DEACTIVATED_ONLY", "1"],
        vec!["not", "finished", "0"],
        vec!["revoking", "access", "0"],
        vec!["done", "12"],
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&want)),
            "{want:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("revoked               12 of 12"),
        "{stdout}"
    );
    assert!(stdout.contains("cxone-offboard verify s3://"), "{stdout}");
    assert!(stdout.contains("time to revoke        p50"), "{stdout}");
}
