//! `GET /metrics` follows the Prometheus conventions: histograms, never
//! summaries; a `# HELP` for every family; `_total` on counters and on
//! nothing else; families present before their first event; the standard
//! `process_*` families; and every gRPC call counted by method and status
//! code, in go-grpc-prometheus's names. The recorder is shared by every test
//! in this binary, so only presence is asserted, never a count.

use std::collections::{BTreeMap, BTreeSet};

use tokenvault::proto::v1 as pb;
use tonic::Code;

use crate::both_backends;
use crate::support::{As, Backend, spawn_vault};

async fn prometheus_conventions_body(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    tv.admin(As::Auditor)
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect("key status as an auditor");
    let refused = tv
        .admin_anonymous()
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect_err("key status without credentials");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let response = reqwest::get(format!("http://{}/metrics", tv.http_addr))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.text().await.expect("the metrics text");
    let exposition = Exposition::parse(&text);

    let summaries: Vec<&String> = exposition
        .types
        .iter()
        .filter(|(_, kind)| kind.as_str() == "summary")
        .map(|(family, _)| family)
        .collect();
    assert!(summaries.is_empty(), "summaries: {summaries:?}\n{text}");

    let unhelped: Vec<&String> = exposition
        .types
        .keys()
        .filter(|family| !exposition.helped.contains(*family))
        .collect();
    assert!(unhelped.is_empty(), "no # HELP: {unhelped:?}\n{text}");

    for (family, kind) in &exposition.types {
        assert_eq!(
            kind == "counter",
            family.ends_with("_total"),
            "{family} is a {kind}: counters end in _total, nothing else does"
        );
        if kind == "histogram" {
            assert!(
                exposition
                    .sample(&format!("{family}_bucket"), &[("le", "+Inf")])
                    .is_some(),
                "{family} has no +Inf bucket\n{text}"
            );
        }
    }
    for sample in &exposition.samples {
        assert!(
            exposition.family_of(&sample.name).is_some(),
            "{} has no # TYPE\n{text}",
            sample.name
        );
    }

    for (family, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("tokenvault_build_info", "gauge"),
        ("grpc_server_handling_seconds", "histogram"),
        ("tokenvault_lease_seconds", "histogram"),
        ("tokenvault_audit_batch_entries", "histogram"),
    ] {
        assert_eq!(
            exposition.types.get(family).map(String::as_str),
            Some(kind),
            "{family}\n{text}"
        );
    }
    let resident = exposition.sample("process_resident_memory_bytes", &[]);
    assert!(resident.is_some_and(|v| v > 0.0), "{text}");
    let build = exposition.sample(
        "tokenvault_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    assert_eq!(build, Some(1.0), "{text}");

    // Families no call of this test touched, there from the start with
    // every outcome the code counts.
    for outcome in ["ok", "invalid_grant", "rate_limited", "unavailable"] {
        assert!(
            exposition
                .sample("tokenvault_refresh_total", &[("outcome", outcome)])
                .is_some(),
            "tokenvault_refresh_total{{outcome={outcome}}}\n{text}"
        );
    }
    for outcome in ["accepted", "invalid"] {
        assert!(
            exposition
                .sample("tokenvault_risc_events_total", &[("outcome", outcome)])
                .is_some(),
            "tokenvault_risc_events_total{{outcome={outcome}}}\n{text}"
        );
    }

    // Both calls, by method and status code.
    let key_status = [
        ("grpc_type", "unary"),
        ("grpc_service", "tokenvault.v1.AdminService"),
        ("grpc_method", "KeyStatus"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = key_status.to_vec();
        labels.push(extra);
        labels
    };
    for code in ["OK", "Unauthenticated"] {
        let handled = exposition.sample("grpc_server_handled_total", &with(("grpc_code", code)));
        assert!(
            handled.is_some_and(|v| v >= 1.0),
            "grpc_server_handled_total of KeyStatus with {code}\n{text}"
        );
    }
    let started = exposition.sample("grpc_server_started_total", &key_status);
    assert!(started.is_some_and(|v| v >= 2.0), "{text}");
    let timed = exposition.sample("grpc_server_handling_seconds_count", &key_status);
    assert!(timed.is_some_and(|v| v >= 2.0), "{text}");
    assert!(
        exposition
            .sample("grpc_server_handling_seconds_bucket", &with(("le", "+Inf")))
            .is_some(),
        "{text}"
    );
}
both_backends!(prometheus_conventions, prometheus_conventions_body);

/// The Prometheus text format, as far as these checks need it.
struct Exposition {
    /// Each family's `# TYPE`.
    types: BTreeMap<String, String>,
    /// The families with a `# HELP`.
    helped: BTreeSet<String>,
    samples: Vec<Sample>,
}

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (family, kind) = rest.split_once(' ').expect("# TYPE <family> <kind>");
                let previous = types.insert(family.to_owned(), kind.to_owned());
                assert!(previous.is_none(), "{family} has two # TYPE lines");
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (family, help) = rest.split_once(' ').expect("# HELP <family> <text>");
                assert!(!help.trim().is_empty(), "{family} has an empty # HELP");
                helped.insert(family.to_owned());
            } else if line.starts_with('#') {
                continue;
            } else {
                samples.push(Sample::parse(line));
            }
        }
        Self {
            types,
            helped,
            samples,
        }
    }

    /// The value of the sample `name` whose labels include every pair of
    /// `labels` (the first such, if several).
    fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The `# TYPE`d family a sample name belongs to: itself, or the
    /// histogram it is a `_bucket`, `_sum` or `_count` of.
    fn family_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.types.contains_key(name) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let family = name.strip_suffix(suffix)?;
            (self.types.get(family).map(String::as_str) == Some("histogram")).then_some(family)
        })
    }
}

impl Sample {
    /// `name value` or `name{k="v",…} value` (no label value here holds a
    /// quote).
    fn parse(line: &str) -> Self {
        let (series, value) = line.rsplit_once(' ').expect("<series> <value>");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("{line}: not a value: {e}")),
        };
        let (name, mut rest) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}')
                    .unwrap_or_else(|| panic!("{line}: no closing brace")),
            ),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while let Some((key, after)) = rest.split_once("=\"") {
            let end = after
                .find('"')
                .unwrap_or_else(|| panic!("{line}: no closing quote"));
            labels.insert(
                key.trim_start_matches(',').to_owned(),
                after[..end].to_owned(),
            );
            rest = &after[end + 1..];
        }
        Self {
            name: name.to_owned(),
            labels,
            value,
        }
    }
}
