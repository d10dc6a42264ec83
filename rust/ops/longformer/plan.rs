//! The Longformer op's plan: everything a call needs but the tensors, in pure Rust
//! (testable without a GPU): the head classes and gathered global tokens, the work lists
//! of every pass (rust/ops/longformer/schedule.rs) packed with the masks into one arena
//! the CUDA path uploads with a single copy, and a small cache of recent plans.

use super::schedule::{Gathered, WorkList, BWD_BLOCK, FWD_BLOCK_M, FWD_BLOCK_N};
use super::LongformerProblem;
use crate::error::{Error, Result};

/// The host side of one call: problem, schedule, and where it lives on the device.
pub(crate) struct Schedule {
    pub(crate) head_class: Vec<i32>,
    pub(crate) num_classes: usize,
    pub(crate) globals: Option<Gathered>,
}

impl Schedule {
    pub(crate) fn new(p: &LongformerProblem) -> Self {
        let (head_class, dilations) = p.head_classes();
        Schedule {
            head_class,
            num_classes: dilations.len(),
            globals: p.gathered_globals(),
        }
    }
}

/// One device buffer holding every small array of a call (uploaded with one copy, freed
/// in stream order when dropped).
pub(crate) struct Arena {
    pub(crate) bytes: Vec<u8>,
}

/// Where an array went in the arena (byte offset).
#[derive(Clone, Copy)]
pub(crate) struct Slot(pub(crate) usize);

impl Arena {
    pub(crate) fn new() -> Self {
        Arena { bytes: Vec::new() }
    }

    pub(crate) fn align(&mut self) {
        while self.bytes.len() % 16 != 0 {
            self.bytes.push(0);
        }
    }

    pub(crate) fn push_i32(&mut self, v: &[i32]) -> Slot {
        self.align();
        let at = self.bytes.len();
        self.bytes.extend(v.iter().flat_map(|x| x.to_ne_bytes()));
        // Keep every slot a valid (possibly empty) address inside the buffer.
        self.bytes.extend([0u8; 4]);
        Slot(at)
    }

    pub(crate) fn push_u8(&mut self, v: &[bool]) -> Slot {
        self.align();
        let at = self.bytes.len();
        self.bytes.extend(v.iter().map(|&x| x as u8));
        self.bytes.push(0);
        Slot(at)
    }

    pub(crate) fn push_list(&mut self, w: &WorkList) -> Result<(Slot, Slot)> {
        if w.ids.len() > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "Longformer work list entries".into(),
                value: w.ids.len() as u64,
                limit: i32::MAX as u64,
            });
        }
        Ok((self.push_i32(&w.offsets), self.push_i32(&w.ids)))
    }
}

/// The arena slots of what every pass shares.
pub(crate) struct Shared {
    pub(crate) dilation: Slot,
    pub(crate) global_mask: Slot,
    pub(crate) padding_mask: Slot,
    pub(crate) head_class: Slot,
    pub(crate) one_class: Slot,
    pub(crate) global_rows: Option<Slot>,
}

pub(crate) fn push_shared(arena: &mut Arena, p: &LongformerProblem, s: &Schedule) -> Shared {
    let dilation: Vec<i32> = p
        .dilation
        .iter()
        .map(|&d| d.min(i32::MAX as usize) as i32)
        .collect();
    Shared {
        dilation: arena.push_i32(&dilation),
        global_mask: arena.push_u8(&p.global),
        padding_mask: arena.push_u8(&p.padding),
        head_class: arena.push_i32(&s.head_class),
        one_class: arena.push_i32(&vec![0; p.heads]),
        global_rows: s.globals.as_ref().map(|g| arena.push_i32(&g.rows)),
    }
}

/// The host side of a call, everything but the tensors: the schedule, and the arena
/// holding its device arrays with the work lists in the launcher's order.
pub(crate) struct Plan {
    pub(crate) s: Schedule,
    pub(crate) arena: Arena,
    pub(crate) sh: Shared,
    pub(crate) lists: Vec<(Slot, Slot)>,
    /// Per list: the splits of its pass (1 = not split).
    pub(crate) splits: Vec<usize>,
}

impl Plan {
    pub(crate) fn new(p: &LongformerProblem) -> Self {
        let s = Schedule::new(p);
        let mut arena = Arena::new();
        let sh = push_shared(&mut arena, p, &s);
        Plan {
            s,
            arena,
            sh,
            lists: Vec::new(),
            splits: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, list: &WorkList, splits: usize) -> Result<()> {
        let slots = self.arena.push_list(list)?;
        self.lists.push(slots);
        self.splits.push(splits);
        Ok(())
    }
}

/// Forward lists: the local rows (global keys packed when there are any), then the
/// global rows (split over keys).
pub(crate) fn forward_plan(p: &LongformerProblem) -> Result<Plan> {
    let mut plan = Plan::new(p);
    match plan.s.globals.clone() {
        Some(g) => {
            plan.push(&p.local_rows_packed_work(&g, FWD_BLOCK_M, FWD_BLOCK_N), 1)?;
            let list = p.global_rows_work(&g, FWD_BLOCK_M, FWD_BLOCK_N);
            let splits = global_row_splits(p, &g, &list, FWD_BLOCK_M);
            plan.push(&list, splits)?;
        }
        None => plan.push(&p.local_rows_work(FWD_BLOCK_M, FWD_BLOCK_N), 1)?,
    }
    Ok(plan)
}

/// Backward lists: dQ of the local rows (global keys packed), dK/dV of the band, then with
/// global tokens dK/dV of the global columns, dQ of the global rows (both split) and
/// dK/dV of the global rows.
pub(crate) fn backward_plan(p: &LongformerProblem) -> Result<Plan> {
    let mut plan = Plan::new(p);
    let b = BWD_BLOCK;
    match plan.s.globals.clone() {
        Some(g) => {
            plan.push(&p.local_rows_packed_work(&g, b, b), 1)?;
            plan.push(&p.band_keys_work(b, b), 1)?;
            let cols = p.global_cols_work(&g, b, b);
            plan.push(&cols, global_row_splits(p, &g, &cols, b))?;
            let rows = p.global_rows_work(&g, b, b);
            plan.push(&rows, global_row_splits(p, &g, &rows, b))?;
            plan.push(&p.global_rows_by_key_work(&g, b, b), 1)?;
        }
        None => {
            plan.push(&p.local_rows_work(b, b), 1)?;
            plan.push(&p.band_keys_work(b, b), 1)?;
        }
    }
    Ok(plan)
}

/// What a plan depends on (not the tensors, dtype, head dim or scale).
#[derive(PartialEq)]
pub(crate) struct PlanKey {
    pub(crate) backward: bool,
    pub(crate) dims: [usize; 3],
    pub(crate) window: usize,
    pub(crate) dilation: Vec<usize>,
    pub(crate) causal: bool,
    pub(crate) global: Vec<bool>,
    pub(crate) padding: Vec<bool>,
}

/// Plans built recently: training calls the op with the same masks step after step, and
/// building the lists costs about as much host time as the kernels take on the GPU.
pub(crate) const PLAN_CACHE_SIZE: usize = 8;

#[allow(clippy::type_complexity)]
pub(crate) static PLAN_CACHE: std::sync::Mutex<Vec<(PlanKey, std::sync::Arc<Plan>)>> =
    std::sync::Mutex::new(Vec::new());

pub(crate) fn cached_plan(
    p: &LongformerProblem,
    backward: bool,
    build: fn(&LongformerProblem) -> Result<Plan>,
) -> Result<std::sync::Arc<Plan>> {
    let key = PlanKey {
        backward,
        dims: [p.batch, p.seqlen, p.heads],
        window: p.window,
        dilation: p.dilation.clone(),
        causal: p.causal,
        global: p.global.clone(),
        padding: p.padding.clone(),
    };
    // A panic elsewhere while holding the lock leaves a consistent cache: keep using it.
    let mut cache = PLAN_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = cache.iter().position(|(k, _)| *k == key) {
        let hit = cache.remove(at);
        let plan = hit.1.clone();
        cache.push(hit);
        return Ok(plan);
    }
    let plan = std::sync::Arc::new(build(p)?);
    if cache.len() == PLAN_CACHE_SIZE {
        cache.remove(0);
    }
    cache.push((key, plan.clone()));
    Ok(plan)
}

/// Thread blocks the global-rows forward should fill before it is split over keys: two
/// waves on a 132-SM GPU.
pub(crate) const GLOBAL_ROWS_TARGET_BLOCKS: usize = 264;
/// Fewest key tiles a split should walk (below that the combine costs more than it saves).
pub(crate) const MIN_TILES_PER_SPLIT: usize = 4;

/// How many splits a pass over gathered global rows (or keys) uses: few of them against
/// a long sequence would otherwise leave most of the GPU idle (one block per tile of
/// `block` gathered entries per head).
pub(crate) fn global_row_splits(
    p: &LongformerProblem,
    g: &Gathered,
    list: &WorkList,
    block: usize,
) -> usize {
    let blocks = p.batch * p.heads * g.per_seq.div_ceil(block);
    let longest = (0..list.rows())
        .map(|r| list.row(r).len())
        .max()
        .unwrap_or(0);
    GLOBAL_ROWS_TARGET_BLOCKS
        .div_ceil(blocks)
        .min(longest / MIN_TILES_PER_SPLIT)
        .max(1)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::longformer::{validate, LongformerOptions, TokenMask};
    use crate::tensor::{DType, Layout};

    /// (B=2, N=300, H=2, D=16), window 8; `global` marks tokens 0 and 150 of sequence 0.
    fn problem(global: bool) -> LongformerProblem {
        let l = Layout::contiguous(&[2, 300, 2, 16]);
        let t = (DType::F16, &l);
        let mut g = vec![false; 600];
        if global {
            g[0] = true;
            g[150] = true;
        }
        let gm = TokenMask::new(g, &[2, 300]);
        validate(t, t, t, None, Some(&gm), None, &LongformerOptions::new(8)).unwrap()
    }

    #[test]
    fn plans_hold_one_list_per_pass() {
        assert_eq!(forward_plan(&problem(false)).unwrap().lists.len(), 1);
        assert_eq!(forward_plan(&problem(true)).unwrap().lists.len(), 2);
        assert_eq!(backward_plan(&problem(false)).unwrap().lists.len(), 2);
        let b = backward_plan(&problem(true)).unwrap();
        assert_eq!(b.lists.len(), 5);
        assert_eq!(b.splits.len(), 5);
        assert!(b.splits.iter().all(|&s| s >= 1));
    }

    #[test]
    fn arena_slots_are_aligned_and_hold_their_values() {
        let mut a = Arena::new();
        let x = a.push_u8(&[true, false, true]);
        let y = a.push_i32(&[7, -1]);
        assert_eq!(x.0 % 16, 0);
        assert_eq!(y.0 % 16, 0);
        assert_eq!(&a.bytes[x.0..x.0 + 3], &[1, 0, 1]);
        let got: Vec<i32> = a.bytes[y.0..y.0 + 8]
            .chunks(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, [7, -1]);
    }

    #[test]
    fn cache_returns_the_same_plan_for_the_same_masks_only() {
        let first = cached_plan(&problem(true), true, backward_plan).unwrap();
        let again = cached_plan(&problem(true), true, backward_plan).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = cached_plan(&problem(false), true, backward_plan).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        let forward = cached_plan(&problem(true), false, forward_plan).unwrap();
        assert!(!Arc::ptr_eq(&first, &forward));
    }
}
