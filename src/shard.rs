//! `run --shard K/N`: [`Shard::select`] keeps the plan's groups (batches to be, one per
//! environment) that fall to shard K of N. A batch never splits; batches are dealt out by estimated cost
//! (largest first, each to the least-loaded shard, ties to the lowest shard, names breaking
//! ties between batches), so the partition is deterministic and balanced, and every shard of
//! the same matrix and filters computes the same one.

use std::collections::BTreeMap;

use crate::plan::Group;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1-based.
    pub index: u32,
    pub count: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad --shard `{given}`: {why}; write K/N with 1 <= K <= N, e.g. --shard 2/3")]
pub struct ShardError {
    pub given: String,
    pub why: &'static str,
}

impl std::str::FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ShardError {
            given: s.to_string(),
            why,
        };
        let (k, n) = s.split_once('/').ok_or_else(|| err("no `/`"))?;
        let index: u32 = k.trim().parse().map_err(|_| err("K is not a number"))?;
        let count: u32 = n.trim().parse().map_err(|_| err("N is not a number"))?;
        if count == 0 || index == 0 || index > count {
            return Err(err("K must be between 1 and N"));
        }
        Ok(Shard { index, count })
    }
}

/// Which shard (0-based) each group falls to, by its environment id.
fn assign(groups: &[Group], count: u32) -> BTreeMap<&str, u32> {
    let mut order: Vec<(&str, u64)> = groups
        .iter()
        .map(|g| (g.env.id.as_str(), g.cost_ms()))
        .collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut load = vec![0u64; count.max(1) as usize];
    let mut out = BTreeMap::new();
    for (id, cost) in order {
        let (i, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(i, l)| (**l, *i))
            .expect("at least one shard");
        load[i] += cost;
        out.insert(id, i as u32);
    }
    out
}

impl Shard {
    /// The groups (batches to be) of this shard, in their original order.
    pub(crate) fn select(&self, groups: Vec<Group>) -> Vec<Group> {
        let a: BTreeMap<String, u32> = assign(&groups, self.count)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        groups
            .into_iter()
            .filter(|g| a.get(&g.env.id) == Some(&(self.index - 1)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!("2/3".parse::<Shard>(), Ok(Shard { index: 2, count: 3 }));
        for bad in ["0/3", "4/3", "3", "a/3", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
