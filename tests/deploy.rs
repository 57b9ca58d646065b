//! deploy/ is checked like code: the metric catalogue matches what the code registers, the alert
//! rules pass `promtool` and their unit tests, alerts and dashboard use only real metrics, and the
//! Kubernetes manifests render with kustomize, validate against the Kubernetes schemas and carry a
//! configuration Cohort accepts. `scripts/services.sh install` installs promtool and
//! kubernetes-validate; `kubectl` comes with the machine image.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use cohort::demo::{play_slide_18, DemoServer};
use cohort::SystemOptions;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn tool(var: &str) -> String {
    std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        panic!("{var} is not set: run `scripts/services.sh install && scripts/services.sh start` and source its env file (scripts/test.sh does)")
    })
}

/// Metric names as the code registers them (without the `cohort_` prefix): the first string
/// literal after each registration call in supervisors/src/metrics.rs.
fn registered() -> BTreeSet<String> {
    let src = read("supervisors/src/metrics.rs");
    let mut names = BTreeSet::new();
    for call in ["counter(", "gauge(", "counter_vec(", "gauge_vec(", "histogram(", "::new("] {
        for (at, _) in src.match_indices(call) {
            let rest = &src[at + call.len()..];
            // The name is the first literal, unless the call's first argument closes first.
            let Some(open) = rest.find('"') else { continue };
            if rest[..open].contains(')') {
                continue;
            }
            let lit = &rest[open + 1..];
            let name = &lit[..lit.find('"').unwrap()];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                names.insert(format!("cohort_{name}"));
            }
        }
    }
    names
}

/// Metric names in the first column of deploy/METRICS.md's table.
fn catalogued() -> BTreeSet<String> {
    read("deploy/METRICS.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `cohort_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("cohort_{n}"))
        .collect()
}

/// Every `cohort_...` metric a PromQL-bearing file mentions, histogram suffixes removed.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("cohort_") {
        let name: String =
            text[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        out.insert(base.to_string());
    }
    out
}

#[test]
fn the_metric_catalogue_names_every_registered_metric_and_nothing_else() {
    let (code, docs) = (registered(), catalogued());
    assert!(code.len() >= 40, "the registration scan found too little: {code:?}");
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let unknown: Vec<_> = docs.difference(&code).collect();
    assert!(undocumented.is_empty(), "registered but not in deploy/METRICS.md: {undocumented:?}");
    assert!(unknown.is_empty(), "in deploy/METRICS.md but not registered: {unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_a_running_cohort_exports_is_catalogued() {
    let demo = DemoServer::start(None, "", SystemOptions::default()).await.unwrap();
    play_slide_18(&demo.client).await.unwrap();
    demo.cohort.settle(Duration::from_secs(10)).await.unwrap();
    demo.cohort.relay_warehouse().await.unwrap();
    let text = demo.client.get("/metrics").await.unwrap().body.as_str().unwrap().to_string();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    assert!(exported.len() >= 20, "{exported:?}");
    let docs = catalogued();
    let missing: Vec<_> = exported.difference(&docs).collect();
    assert!(missing.is_empty(), "exported but not catalogued: {missing:?}");
    demo.stop().await.unwrap();
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = tool("COHORT_TEST_PROMTOOL");
    let dir = repo("deploy/prometheus");
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The three tiers of slide 15, each routed by its severity label.
    let rules = read("deploy/prometheus/alerts.yml");
    for tier in ["severity: critical", "severity: warning", "severity: info"] {
        assert!(rules.contains(tier), "no {tier} rule");
    }
}

#[test]
fn alerts_and_the_dashboard_use_only_catalogued_metrics() {
    let docs = catalogued();
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/cohort.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 15, "the dashboard has {} panels", panels.len());
    let exprs: Vec<&str> = panels.iter().filter_map(|p| p["targets"][0]["expr"].as_str()).collect();
    assert_eq!(exprs.len(), panels.len(), "every panel has a query");
    for (what, text) in [("alerts.yml", read("deploy/prometheus/alerts.yml")), ("cohort.json", exprs.join("\n"))] {
        let used = mentioned(&text);
        assert!(used.len() >= 8, "{what} uses too few metrics: {used:?}");
        let unknown: Vec<_> = used.difference(&docs).collect();
        assert!(unknown.is_empty(), "{what} uses metrics Cohort does not export: {unknown:?}");
    }
}

/// `kubectl kustomize DIR`, written to a temporary file.
/// The `COHORT__` variables the image sets (`ENV` in deploy/Dockerfile, continuation lines
/// joined).
fn dockerfile_env() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile").replace("\\\n", " ");
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|rest| rest.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .filter(|(k, _)| k.starts_with("COHORT__"))
        .collect();
    assert!(!vars.is_empty(), "the image sets its listen address");
    vars
}

fn render(dir: &str, out: &Path) {
    render_path(&repo(dir), out)
}

fn render_path(dir: &Path, out: &Path) {
    let dir = dir.display();
    let rendered = Command::new("kubectl")
        .args(["kustomize", &dir.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render deploy/k8s (it comes with the machine image): {e}"));
    assert!(rendered.status.success(), "kustomize {dir}: {}", String::from_utf8_lossy(&rendered.stderr));
    std::fs::write(out, &rendered.stdout).unwrap();
}

/// The rendered documents as JSON (through the tools' Python, which has PyYAML).
fn documents(file: &Path) -> Vec<Value> {
    let python = format!("{}/python", tool("COHORT_TEST_DEPLOY_TOOLS"));
    let out = Command::new(python)
        .args(["-c", "import json,sys,yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn kubernetes_manifests_render_validate_and_carry_a_configuration_cohort_accepts() {
    let validate = format!("{}/kubernetes-validate", tool("COHORT_TEST_DEPLOY_TOOLS"));
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["deploy/k8s/base", "deploy/k8s/overlays/gke"] {
        let file = tmp.path().join("rendered.yaml");
        render(dir, &file);
        let out = Command::new(&validate).args(["-k", "1.32.0", "--strict", "--quiet"]).arg(&file).output().unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !report.contains("ERROR"), "{dir} does not validate:\n{report}");

        let docs = documents(&file);
        let deployment = kind(&docs, "Deployment", "cohort");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health/live");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health/ready");
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(kind(&docs, "Service", "cohort-peers")["spec"]["clusterIP"], "None", "peers are headless");
        // Several replicas in cluster mode, scaled by the HPA, each reachable at its pod address.
        assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2, "{dir}");
        // A rollout waits for each new pod's groups to settle before replacing the next.
        assert!(deployment["spec"]["minReadySeconds"].as_u64().unwrap() >= 10, "{dir}");
        let hpa = kind(&docs, "HorizontalPodAutoscaler", "cohort");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "cohort");
        assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() <= hpa["spec"]["maxReplicas"].as_u64().unwrap());
        let env = container["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "COHORT__CLUSTER__ADVERTISE_URL"), "{dir}: peers need the pod address");
        kind(&docs, "PodDisruptionBudget", "cohort");
        let sa = kind(&docs, "ServiceAccount", "cohort");
        assert!(sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].is_string(), "Workload Identity");

        // The ConfigMap's file plus the Secret's variables make a configuration Cohort starts with.
        let toml = kind(&docs, "ConfigMap", "cohort-config")["data"]["cohort.toml"].as_str().unwrap().to_string();
        let path = tmp.path().join("cohort.toml");
        std::fs::write(&path, &toml).unwrap();
        let secrets = kind(&docs, "Secret", "cohort-secrets")["stringData"].as_object().unwrap().clone();
        // The image's variables first, then the container's literal ones, then the Secret's
        // (each outranks the file, as it would in the pod).
        let mut vars: Vec<(String, String)> = dockerfile_env();
        for e in container["env"].as_array().unwrap() {
            if let Some(v) = e["value"].as_str() {
                vars.push((e["name"].as_str().unwrap().to_string(), v.to_string()));
            }
        }
        for (k, v) in &secrets {
            assert!(k.starts_with("COHORT__"), "{k}");
            vars.push((k.clone(), v.as_str().unwrap().to_string()));
        }
        for (k, v) in &vars {
            std::env::set_var(k, v);
        }
        let config = cohort_config::Config::load(Some(&path));
        for (k, _) in &vars {
            std::env::remove_var(k);
        }
        let config =
            config.unwrap_or_else(|e| panic!("{dir}: the ConfigMap and Secret are not a valid configuration: {e}"));
        assert!(config.storage.url.starts_with("mongodb://"), "{dir}");
        assert!(config.cluster.enabled, "{dir}: several replicas need cluster mode");
        assert!(
            hpa["spec"]["maxReplicas"].as_i64().unwrap() <= i64::from(config.bus.partitions),
            "{dir}: no more replicas than partitions"
        );
        assert!(config.gdpr.key_url.starts_with("gcpkms://"), "{dir}");
        assert!(config.auth.api_tokens.is_empty(), "{dir}: no all-scope plain tokens in production");
        // The scoped tokens file is mounted where the configuration looks for it, and parses.
        let tokens = kind(&docs, "Secret", "cohort-api-tokens")["stringData"]["tokens.toml"].as_str().unwrap();
        let tokens = cohort_config::parse_tokens_file(tokens).unwrap_or_else(|e| panic!("{dir}: tokens.toml: {e}"));
        assert!(tokens.iter().any(|t| t.scopes == ["metrics:read"]), "{dir}: a scrape token for Prometheus");
        let deployment = kind(&docs, "Deployment", "cohort");
        let mount = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "api-tokens")
            .unwrap_or_else(|| panic!("{dir}: the tokens Secret is not mounted"));
        let mount_path = mount["mountPath"].as_str().unwrap();
        assert_eq!(config.auth.tokens_file, format!("{mount_path}/tokens.toml"), "{dir}");
        assert!(
            config.sources.web.write_key.starts_with("replace-with"),
            "{dir}: the Secret's variables reach the config"
        );
    }
}
