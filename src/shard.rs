//! `run --shard K/N`: [`Shard::select`] keeps the cells of the batches (environments) that
//! fall to shard K of N. A batch never splits; batches are dealt out by estimated cost
//! (largest first, each to the least-loaded shard, ties to the lowest shard, names breaking
//! ties between batches), so the partition is deterministic and balanced, and every shard of
//! the same matrix and filters computes the same one.

use std::collections::BTreeMap;

use crate::matrix::model::{BackendKind, Cell};

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

/// Estimated cost of a batch in milliseconds: starting its environment plus its cells.
/// Measured on this project's machines: a host batch starts in ~0.1 s and runs a cell in
/// ~10 ms; a container starts in ~1.5 s and execs a cell in ~50 ms; a QEMU guest boots in
/// ~15 s.
pub fn estimated_cost_ms(backend: BackendKind, cells: usize) -> u64 {
    let (start, per_cell) = match backend {
        BackendKind::Host => (100, 10),
        BackendKind::Docker => (1_500, 50),
        BackendKind::Qemu => (15_000, 50),
    };
    start + per_cell * cells as u64
}

/// Which shard (0-based) each environment id falls to.
pub fn assign(cells: &[Cell], count: u32) -> BTreeMap<String, u32> {
    let mut batches: BTreeMap<&str, (BackendKind, usize)> = BTreeMap::new();
    for c in cells {
        batches.entry(&c.env.id).or_insert((c.env.backend, 0)).1 += 1;
    }
    let mut order: Vec<(&str, u64)> = batches
        .iter()
        .map(|(id, (b, n))| (*id, estimated_cost_ms(*b, *n)))
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
        out.insert(id.to_string(), i as u32);
    }
    out
}

impl Shard {
    /// The cells of this shard, in their original order.
    pub fn select(&self, cells: Vec<Cell>) -> Vec<Cell> {
        let a = assign(&cells, self.count);
        cells
            .into_iter()
            .filter(|c| a.get(&c.env.id) == Some(&(self.index - 1)))
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

    #[test]
    fn cost_orders_backends() {
        assert!(
            estimated_cost_ms(BackendKind::Qemu, 3) > estimated_cost_ms(BackendKind::Docker, 3)
        );
        assert!(
            estimated_cost_ms(BackendKind::Docker, 3) > estimated_cost_ms(BackendKind::Host, 3)
        );
    }
}
