//! Where each key sits in the TOML text, so validation errors found after serde can still name a line.

use std::collections::HashMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Byte offsets to lines, and dotted key paths (`map[2].topic`) to the line of their key.
#[derive(Debug, Default, Clone)]
pub struct SourceMap {
    line_starts: Vec<usize>,
    keys: HashMap<String, usize>,
}

impl SourceMap {
    /// Indexes `text`; `table` is its parsed form (spans point into `text`).
    pub fn new(text: &str, table: &DeTable<'_>) -> Self {
        let mut map = SourceMap {
            line_starts: line_starts(text),
            keys: HashMap::new(),
        };
        map.walk_table("", table);
        map
    }

    /// Only line numbers, for text that did not parse.
    pub fn lines_only(text: &str) -> Self {
        SourceMap {
            line_starts: line_starts(text),
            keys: HashMap::new(),
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of_offset(&self, offset: usize) -> usize {
        match self.line_starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    /// 1-based line of a span's start.
    pub fn line_of_span(&self, span: &Range<usize>) -> usize {
        self.line_of_offset(span.start)
    }

    /// Line of a key path such as `uplink.broker` or `listener[0].bind`; falls back to the nearest parent.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.keys.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    fn walk_table(&mut self, prefix: &str, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let line = self.line_of_span(&key.span());
            self.keys.insert(path.clone(), line);
            self.walk_value(&path, value);
        }
    }

    fn walk_value(&mut self, path: &str, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::Table(t) => self.walk_table(path, t),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let line = self.line_of_span(&item.span());
                    self.keys.insert(p.clone(), line);
                    self.walk_value(&p, item);
                }
            }
            _ => {}
        }
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lines_of_nested_keys() {
        let text = "[site]\nid = \"a\"\n\n[[listener]]\nbind = \"x\"\n[[listener]]\nbind = \"y\"\n";
        let table = DeTable::parse(text).unwrap();
        let map = SourceMap::new(text, table.get_ref());
        assert_eq!(map.line_of("site.id"), Some(2));
        assert_eq!(map.line_of("listener[1].bind"), Some(7));
        assert_eq!(map.line_of("listener[1].tls_cert"), Some(6));
        assert_eq!(map.line_of("nothing"), None);
    }
}
