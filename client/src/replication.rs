//! Replicated pushes (SOURCES.md, "Replication"), for every client that makes one: the
//! paradata the first server gets, and how each replica ended according to its report.

/// The paradata for the first server of a replicated push into `sink` (a `file:` sink): the
/// rest of the chain as `replicas=`, and `quorum=` when fewer than all must commit (`quorum`
/// counts every server, the first included).
pub fn replicated_paradata(sink: &str, chain: &[String], quorum: Option<usize>) -> String {
    if chain.is_empty() {
        return sink.to_string();
    }
    let mut text = sink.to_string();
    text.push(if text.contains('?') { '&' } else { '?' });
    text.push_str(&format!("replicas={}", chain.join(",")));
    if let Some(q) = quorum.filter(|q| *q <= chain.len()) {
        text.push_str(&format!("&quorum={q}"));
    }
    text
}

/// How one replica of a complete replicated push ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// Its endpoint, as given.
    pub endpoint: String,
    /// `committed`, an error code (`sink_failed`, `connection_lost`, ...), or `unknown` (not
    /// reached).
    pub state: String,
    /// What it said, empty when it committed.
    pub message: String,
}

/// Every replica's state after a replicated push completed at the first server (`first`),
/// read from the report its COMPLETE carried: one line per later replica reached,
/// `ENDPOINT ok` or `ENDPOINT CODE MESSAGE`.
pub fn replica_states(first: &str, chain: &[String], report: Option<&str>) -> Vec<ReplicaState> {
    let mut all: Vec<ReplicaState> = std::iter::once(first)
        .chain(chain.iter().map(String::as_str))
        .map(|endpoint| ReplicaState {
            endpoint: endpoint.to_string(),
            state: "unknown".into(),
            message: "not reached".into(),
        })
        .collect();
    all[0].state = "committed".into();
    all[0].message.clear();
    for line in report.unwrap_or("").lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(endpoint), Some(state)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(i) = chain.iter().position(|r| r == endpoint).map(|i| i + 1) else {
            continue;
        };
        all[i].state = if state == "ok" { "committed" } else { state }.into();
        all[i].message = parts.next().unwrap_or("").into();
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_server_gets_the_rest_of_the_chain() {
        let chain = vec!["b:1".to_string(), "c:1".to_string()];
        assert_eq!(replicated_paradata("file:x", &[], Some(1)), "file:x");
        assert_eq!(
            replicated_paradata("file:x?replace=true", &chain, None),
            "file:x?replace=true&replicas=b:1,c:1"
        );
        assert_eq!(
            replicated_paradata("file:x", &chain, Some(2)),
            "file:x?replicas=b:1,c:1&quorum=2"
        );
        // All three of three: no quorum mode.
        assert_eq!(
            replicated_paradata("file:x", &chain, Some(3)),
            "file:x?replicas=b:1,c:1"
        );
    }

    #[test]
    fn the_report_says_how_each_replica_ended() {
        let chain = vec!["b:1".to_string(), "c:1".to_string(), "d:1".to_string()];
        let states = replica_states(
            "a:1",
            &chain,
            Some("b:1 sink_failed no space left\nc:1 ok\n"),
        );
        let short: Vec<(&str, &str)> = states
            .iter()
            .map(|s| (s.endpoint.as_str(), s.state.as_str()))
            .collect();
        assert_eq!(
            short,
            [
                ("a:1", "committed"),
                ("b:1", "sink_failed"),
                ("c:1", "committed"),
                ("d:1", "unknown")
            ]
        );
        assert_eq!(states[1].message, "no space left");
    }
}
