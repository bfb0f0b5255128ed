//! The stage DAG of a validated pipeline: edges from input references, ancestors/descendants for
//! `--only` and failure propagation, and text / Graphviz / Mermaid renderings for `pipe graph`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

use crate::config::Pipeline;

/// Edges run upstream → downstream, labelled with the input role.
pub struct Dag {
    graph: DiGraph<String, String>,
    index: BTreeMap<String, NodeIndex>,
}

impl Dag {
    pub fn new(p: &Pipeline) -> Self {
        let mut graph = DiGraph::new();
        let mut index = BTreeMap::new();
        for s in &p.stages {
            index.insert(s.name.clone(), graph.add_node(s.name.clone()));
        }
        for s in &p.stages {
            for (role, ups) in &s.inputs {
                for u in ups {
                    if let (Some(&a), Some(&b)) = (index.get(u), index.get(&s.name)) {
                        graph.add_edge(a, b, role.clone());
                    }
                }
            }
        }
        Self { graph, index }
    }

    /// `name` and everything downstream of it.
    pub fn descendants(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(&n) = self.index.get(name) {
            let mut dfs = Dfs::new(&self.graph, n);
            while let Some(x) = dfs.next(&self.graph) {
                out.insert(self.graph[x].clone());
            }
        }
        out
    }

    /// `name` and everything it needs.
    pub fn ancestors(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(&n) = self.index.get(name) {
            let rev = Reversed(&self.graph);
            let mut dfs = Dfs::new(rev, n);
            while let Some(x) = dfs.next(rev) {
                out.insert(self.graph[x].clone());
            }
        }
        out
    }

    /// Direct upstream stage names of `name`.
    pub fn parents(&self, name: &str) -> BTreeSet<String> {
        self.index
            .get(name)
            .map(|&n| {
                self.graph.neighbors_directed(n, Direction::Incoming).map(|x| self.graph[x].clone()).collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

/// Renders the DAG. `Text` lists each stage with its kind and inputs, in run order.
pub fn render(p: &Pipeline, format: GraphFormat) -> String {
    let mut s = String::new();
    match format {
        GraphFormat::Text => {
            for st in &p.stages {
                let _ = write!(s, "{} ({})", st.name, st.kind);
                let ins: Vec<String> =
                    st.inputs.iter().map(|(role, ups)| format!("{role} <- {}", ups.join(", "))).collect();
                if !ins.is_empty() {
                    let _ = write!(s, "  [{}]", ins.join("; "));
                }
                s.push('\n');
            }
        }
        GraphFormat::Dot => {
            let _ = writeln!(s, "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];", p.name);
            for st in &p.stages {
                let _ = writeln!(s, "  \"{}\" [label=\"{}\\n({})\"];", st.name, st.name, st.kind);
            }
            for st in &p.stages {
                for (role, ups) in &st.inputs {
                    for u in ups {
                        let _ = writeln!(s, "  \"{u}\" -> \"{}\" [label=\"{role}\"];", st.name);
                    }
                }
            }
            s.push_str("}\n");
        }
        GraphFormat::Mermaid => {
            // Node ids are positions: stage names may contain characters Mermaid ids cannot.
            let id: BTreeMap<&str, usize> =
                p.stages.iter().enumerate().map(|(i, st)| (st.name.as_str(), i)).collect();
            s.push_str("flowchart LR\n");
            for (i, st) in p.stages.iter().enumerate() {
                let _ = writeln!(s, "  s{i}[\"{}<br/>({})\"]", st.name, st.kind);
            }
            for st in &p.stages {
                for (role, ups) in &st.inputs {
                    for u in ups {
                        let _ = writeln!(s, "  s{} -->|{role}| s{}", id[u.as_str()], id[st.name.as_str()]);
                    }
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::kinds;

    const TEXT: &str = r#"
[pipeline]
name = "g"
[stages.web]
kind = "source"
data = "web.bin"
seed = 1
[stages.chat]
kind = "source"
data = "chat.bin"
seed = 2
[stages.train]
kind = "train"
activations = ["web", "chat"]
k = 4
[stages.report]
kind = "sink"
from = "train"
[stages.alone]
kind = "sink"
"#;

    fn pipeline() -> Pipeline {
        let env = |_: &str| None;
        crate::config::load_str(Path::new("/p/g.toml"), TEXT, &[], &kinds::registry(), &env).unwrap()
    }

    fn check(format: GraphFormat, expected: &str) {
        assert_eq!(render(&pipeline(), format), expected);
    }

    use std::path::Path;

    #[test]
    fn ancestors_and_descendants() {
        let dag = Dag::new(&pipeline());
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(dag.ancestors("report"), set(&["chat", "report", "train", "web"]));
        assert_eq!(dag.descendants("web"), set(&["report", "train", "web"]));
        assert_eq!(dag.parents("train"), set(&["chat", "web"]));
        assert_eq!(dag.descendants("alone"), set(&["alone"]));
    }

    #[test]
    fn text() {
        check(
            GraphFormat::Text,
            "alone (sink)\nchat (source)\nweb (source)\ntrain (train)  [activations <- web, chat]\nreport (sink)  [from <- train]\n",
        );
    }

    #[test]
    fn dot() {
        check(
            GraphFormat::Dot,
            r#"digraph "g" {
  rankdir=LR;
  node [shape=box];
  "alone" [label="alone\n(sink)"];
  "chat" [label="chat\n(source)"];
  "web" [label="web\n(source)"];
  "train" [label="train\n(train)"];
  "report" [label="report\n(sink)"];
  "web" -> "train" [label="activations"];
  "chat" -> "train" [label="activations"];
  "train" -> "report" [label="from"];
}
"#,
        );
    }

    #[test]
    fn mermaid() {
        check(
            GraphFormat::Mermaid,
            "flowchart LR\n  s0[\"alone<br/>(sink)\"]\n  s1[\"chat<br/>(source)\"]\n  s2[\"web<br/>(source)\"]\n  s3[\"train<br/>(train)\"]\n  s4[\"report<br/>(sink)\"]\n  s2 -->|activations| s3\n  s1 -->|activations| s3\n  s3 -->|from| s4\n",
        );
    }
}
