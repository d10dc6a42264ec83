//! The host-built work lists of the Longformer kernels (kernels/include/fk_longformer.h):
//! for every tile of a pass's outer rows, the inner tiles its thread block visits.
//!
//! Each list names every inner tile that holds a pair of the pass's rule (the kernels
//! apply the rule per element inside a visited tile, so a superset is correct and a
//! missing tile is not). It is built from tile-level facts, never per (query, key) pair:
//! the band of a run of rows [lo, hi] under dilation d is the union over t of the
//! intervals [lo + d t, hi + d t], one interval when hi - lo + 1 >= d. So building costs
//! O(tiles listed) and the lists grow linearly in N for a fixed window and number of
//! global tokens.

use super::LongformerProblem;

/// Forward: query rows per tile (`FK_LONGFORMER_BLOCK_M`).
pub const FWD_BLOCK_M: usize = 128;
/// Forward: keys per tile (`FK_LONGFORMER_BLOCK_N`).
pub const FWD_BLOCK_N: usize = 64;
/// Backward: query and key tile size of the dQ and dK/dV passes (`FK_LONGFORMER_BWD_BLOCK`).
pub const BWD_BLOCK: usize = 64;

/// Which pairs a pass computes (fk_longformer.h's THE RULE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Local rows: their band keys and every global key.
    Local,
    /// Global rows (gathered): every non-padded key.
    GlobalRows,
    /// dK/dV: local rows x band keys that are not global.
    LocalBand,
    /// dK/dV: local rows x global keys (gathered).
    GlobalCols,
}

/// A CSR work list: outer tile `r` visits inner tiles `ids[offsets[r]..offsets[r + 1]]`,
/// increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkList {
    pub offsets: Vec<i32>,
    pub ids: Vec<i32>,
}

impl WorkList {
    fn new() -> Self {
        WorkList {
            offsets: vec![0],
            ids: Vec::new(),
        }
    }

    fn push_row(&mut self, tiles: &[usize]) {
        self.ids.extend(tiles.iter().map(|&t| t as i32));
        self.offsets.push(self.ids.len() as i32);
    }

    /// Number of outer tiles (CSR rows).
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The inner tiles of outer tile `r`.
    pub fn row(&self, r: usize) -> &[i32] {
        &self.ids[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }

    /// (outer, inner) tile pairs listed: the thread-block steps of the pass.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Gathered rows: each sequence's global tokens, increasing, then -1 up to `per_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gathered {
    pub per_seq: usize,
    /// (B, per_seq) row-major token indices.
    pub rows: Vec<i32>,
}

impl Gathered {
    /// The valid entries of tile `m` (of `block` entries) of sequence `b`.
    fn tile(&self, b: usize, m: usize, block: usize) -> impl Iterator<Item = usize> + '_ {
        let row = &self.rows[b * self.per_seq..(b + 1) * self.per_seq];
        row[m * block..((m + 1) * block).min(self.per_seq)]
            .iter()
            .take_while(|&&x| x >= 0)
            .map(|&x| x as usize)
    }

    fn tiles(&self, block: usize) -> usize {
        self.per_seq.div_ceil(block)
    }
}

/// Per sequence: prefix counts of local and of non-padded tokens (tile emptiness tests
/// in O(1)).
struct Counts {
    n: usize,
    local: Vec<Vec<u32>>,
    unpadded: Vec<Vec<u32>>,
}

impl Counts {
    fn new(p: &LongformerProblem) -> Self {
        let prefix = |f: &dyn Fn(usize) -> bool| {
            let mut acc = vec![0u32; p.seqlen + 1];
            for i in 0..p.seqlen {
                acc[i + 1] = acc[i] + f(i) as u32;
            }
            acc
        };
        Counts {
            n: p.seqlen,
            local: (0..p.batch)
                .map(|b| prefix(&|i| !p.is_global(b, i) && !p.is_padded(b, i)))
                .collect(),
            unpadded: (0..p.batch)
                .map(|b| prefix(&|i| !p.is_padded(b, i)))
                .collect(),
        }
    }

    fn any(acc: &[u32], lo: usize, hi_excl: usize) -> bool {
        acc[hi_excl] > acc[lo]
    }

    fn span(&self, block: usize, t: usize) -> (usize, usize) {
        (t * block, ((t + 1) * block).min(self.n))
    }

    fn tile_has_local(&self, b: usize, block: usize, t: usize) -> bool {
        let (lo, hi) = self.span(block, t);
        Self::any(&self.local[b], lo, hi)
    }

    fn tile_has_key(&self, b: usize, block: usize, t: usize) -> bool {
        let (lo, hi) = self.span(block, t);
        Self::any(&self.unpadded[b], lo, hi)
    }
}

/// Appends (increasing, without repeats) the tiles of size `block` that meet
/// { x + d s : x in [lo, hi], s in [s0, s1] } within [0, n).
fn band_tiles(
    lo: usize,
    hi: usize,
    d: usize,
    s0: i64,
    s1: i64,
    n: usize,
    block: usize,
) -> Vec<usize> {
    let (lo, hi, d, n) = (lo as i64, hi as i64, d as i64, n as i64);
    let mut out: Vec<usize> = Vec::new();
    let mut push = |a: i64, b: i64| {
        let (a, b) = (a.max(0), b.min(n - 1));
        if a > b {
            return;
        }
        let (ta, tb) = ((a / block as i64) as usize, (b / block as i64) as usize);
        let from = match out.last() {
            Some(&last) if last >= ta => last + 1,
            _ => ta,
        };
        out.extend(from..=tb);
    };
    if hi - lo + 1 >= d {
        // Consecutive intervals overlap or touch: one interval.
        push(lo + d * s0, hi + d * s1);
    } else {
        // Only the s whose interval meets [0, n): at most (n + hi - lo) / d + 1 of them.
        let first = s0.max((-hi).div_euclid(d));
        let last = s1.min((n - 1 - lo).div_euclid(d));
        for s in first..=last {
            push(lo + d * s, hi + d * s);
        }
    }
    out
}

/// Merges two increasing tile lists into one without repeats.
fn merge(a: &[usize], b: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl LongformerProblem {
    /// Heads grouped by dilation: (class of each head, dilation of each class).
    pub fn head_classes(&self) -> (Vec<i32>, Vec<usize>) {
        let mut dilations: Vec<usize> = Vec::new();
        let class = self
            .dilation
            .iter()
            .map(|&d| match dilations.iter().position(|&x| x == d) {
                Some(c) => c as i32,
                None => {
                    dilations.push(d);
                    dilations.len() as i32 - 1
                }
            })
            .collect();
        (class, dilations)
    }

    /// Every sequence's global tokens as gathered rows; `None` when there are none.
    pub fn gathered_globals(&self) -> Option<Gathered> {
        let per_seq = self.global_positions.iter().map(Vec::len).max()?;
        if per_seq == 0 {
            return None;
        }
        let mut rows = vec![-1i32; self.batch * per_seq];
        for (b, g) in self.global_positions.iter().enumerate() {
            for (x, &i) in g.iter().enumerate() {
                rows[b * per_seq + x] = i as i32;
            }
        }
        Some(Gathered { per_seq, rows })
    }

    /// Window and dilation clipped to N (changes no key), and the window's t range.
    fn band(&self, d: usize) -> (usize, i64, i64) {
        let n = self.seqlen.max(1);
        let w = self.window.min(n) as i64;
        (d.min(n), -w, if self.causal { 0 } else { w })
    }

    /// Pass LOCAL (forward, dQ): outer = contiguous query tiles of `bm`, per
    /// (sequence, dilation class); inner = key tiles of `bn` meeting a local row's band or
    /// holding a global key it sees.
    pub fn local_rows_work(&self, bm: usize, bn: usize) -> WorkList {
        let counts = Counts::new(self);
        let (_, dilations) = self.head_classes();
        let n = self.seqlen;
        let mut list = WorkList::new();
        for b in 0..self.batch {
            for &dil in &dilations {
                let (d, t0, t1) = self.band(dil);
                for m in 0..n.div_ceil(bm) {
                    let (lo, hi) = counts.span(bm, m);
                    let mut rows =
                        (lo..hi).filter(|&i| !self.is_global(b, i) && !self.is_padded(b, i));
                    let Some(first) = rows.next() else {
                        list.push_row(&[]);
                        continue;
                    };
                    let last = rows.next_back().unwrap_or(first);
                    let mut tiles = band_tiles(first, last, d, t0, t1, n, bn);
                    tiles.retain(|&t| counts.tile_has_key(b, bn, t));
                    let globals: Vec<usize> = self.global_positions[b]
                        .iter()
                        .filter(|&&g| !self.causal || g <= last)
                        .map(|&g| g / bn)
                        .collect();
                    list.push_row(&merge(&tiles, &globals));
                }
            }
        }
        list
    }

    /// Pass LOCAL with packed global keys (forward): outer = contiguous query tiles of
    /// `bm`, per (sequence, dilation class); inner = the key tiles of `bn` meeting a local
    /// row's band at a non-global key (ids below ceil(N / bn)), then ceil(N / bn) + m for
    /// each tile m (of `bn` entries) of the gathered global keys that a local row of the
    /// tile sees. Each global key then costs one packed column instead of a whole tile.
    pub fn local_rows_packed_work(&self, g: &Gathered, bm: usize, bn: usize) -> WorkList {
        let counts = Counts::new(self);
        let (_, dilations) = self.head_classes();
        let n = self.seqlen;
        let key_tiles = n.div_ceil(bn);
        let mut list = WorkList::new();
        for b in 0..self.batch {
            for &dil in &dilations {
                let (d, t0, t1) = self.band(dil);
                for m in 0..n.div_ceil(bm) {
                    let (lo, hi) = counts.span(bm, m);
                    let mut rows =
                        (lo..hi).filter(|&i| !self.is_global(b, i) && !self.is_padded(b, i));
                    let Some(first) = rows.next() else {
                        list.push_row(&[]);
                        continue;
                    };
                    let last = rows.next_back().unwrap_or(first);
                    let mut tiles = band_tiles(first, last, d, t0, t1, n, bn);
                    // Band pairs need a local (non-padded, non-global) key.
                    tiles.retain(|&t| counts.tile_has_local(b, bn, t));
                    tiles.extend(
                        (0..g.tiles(bn))
                            .filter(|&x| {
                                g.tile(b, x, bn)
                                    .next()
                                    .is_some_and(|key| !self.causal || key <= last)
                            })
                            .map(|x| key_tiles + x),
                    );
                    list.push_row(&tiles);
                }
            }
        }
        list
    }

    /// Pass LOCAL_BAND (dK/dV): outer = contiguous key tiles of `bn`, per (sequence,
    /// dilation class); inner = query tiles of `bm` holding a local row whose band meets a
    /// non-global key of the tile.
    pub fn band_keys_work(&self, bn: usize, bm: usize) -> WorkList {
        let counts = Counts::new(self);
        let (_, dilations) = self.head_classes();
        let n = self.seqlen;
        let mut list = WorkList::new();
        for b in 0..self.batch {
            for &dil in &dilations {
                let (d, t0, t1) = self.band(dil);
                for kt in 0..n.div_ceil(bn) {
                    let (lo, hi) = counts.span(bn, kt);
                    let mut keys =
                        (lo..hi).filter(|&j| !self.is_global(b, j) && !self.is_padded(b, j));
                    let Some(first) = keys.next() else {
                        list.push_row(&[]);
                        continue;
                    };
                    let last = keys.next_back().unwrap_or(first);
                    // Query i sees key j = i + d t, so i = j + d s with s in [-t1, -t0].
                    let mut tiles = band_tiles(first, last, d, -t1, -t0, n, bm);
                    tiles.retain(|&t| counts.tile_has_local(b, bm, t));
                    list.push_row(&tiles);
                }
            }
        }
        list
    }

    /// Pass GLOBAL_COLS (dK/dV): outer = tiles of `bk` gathered global keys per sequence;
    /// inner = query tiles of `bm` holding a local row (causal: one at or after the
    /// tile's first key).
    pub fn global_cols_work(&self, g: &Gathered, bk: usize, bm: usize) -> WorkList {
        let counts = Counts::new(self);
        let n = self.seqlen;
        let mut list = WorkList::new();
        for b in 0..self.batch {
            for m in 0..g.tiles(bk) {
                let Some(first_key) = g.tile(b, m, bk).next() else {
                    list.push_row(&[]);
                    continue;
                };
                let tiles: Vec<usize> = (0..n.div_ceil(bm))
                    .filter(|&t| {
                        let (lo, hi) = counts.span(bm, t);
                        let lo = if self.causal { lo.max(first_key) } else { lo };
                        lo < hi && Counts::any(&counts.local[b], lo, hi)
                    })
                    .collect();
                list.push_row(&tiles);
            }
        }
        list
    }

    /// Pass GLOBAL_ROWS (forward, dQ): outer = tiles of `bm` gathered global rows per
    /// sequence; inner = key tiles of `bn` holding a non-padded key (causal: one at or
    /// before the tile's last row).
    pub fn global_rows_work(&self, g: &Gathered, bm: usize, bn: usize) -> WorkList {
        let counts = Counts::new(self);
        let n = self.seqlen;
        let mut list = WorkList::new();
        for b in 0..self.batch {
            for m in 0..g.tiles(bm) {
                let Some(last_row) = g.tile(b, m, bm).last() else {
                    list.push_row(&[]);
                    continue;
                };
                let tiles: Vec<usize> = (0..n.div_ceil(bn))
                    .filter(|&t| {
                        let (lo, hi) = counts.span(bn, t);
                        let hi = if self.causal {
                            hi.min(last_row + 1)
                        } else {
                            hi
                        };
                        lo < hi && Counts::any(&counts.unpadded[b], lo, hi)
                    })
                    .collect();
                list.push_row(&tiles);
            }
        }
        list
    }

    /// Pass GLOBAL_ROWS (dK/dV): outer = contiguous key tiles of `bn`; inner = tiles of
    /// `bm` gathered global rows that see a key of the tile (causal: a row at or after its
    /// first non-padded key).
    pub fn global_rows_by_key_work(&self, g: &Gathered, bn: usize, bm: usize) -> WorkList {
        let n = self.seqlen;
        let mut list = WorkList::new();
        for b in 0..self.batch {
            for kt in 0..n.div_ceil(bn) {
                let (lo, hi) = (kt * bn, ((kt + 1) * bn).min(n));
                let Some(first_key) = (lo..hi).find(|&j| !self.is_padded(b, j)) else {
                    list.push_row(&[]);
                    continue;
                };
                let tiles: Vec<usize> = (0..g.tiles(bm))
                    .filter(|&m| match g.tile(b, m, bm).last() {
                        Some(last_row) => !self.causal || last_row >= first_key,
                        None => false,
                    })
                    .collect();
                list.push_row(&tiles);
            }
        }
        list
    }

    /// Whether the pair (query i, key j) of head h belongs to `pass` (THE RULE of
    /// fk_longformer.h; for the gathered passes, "listed" means global).
    pub fn pass_allows(&self, pass: Pass, b: usize, h: usize, i: usize, j: usize) -> bool {
        let n = self.seqlen;
        if i >= n || j >= n || self.is_padded(b, j) || (self.causal && j > i) {
            return false;
        }
        let local = !self.is_global(b, i) && !self.is_padded(b, i);
        let band = || {
            let d = self.dilation[h].min(n);
            let dist = i.abs_diff(j);
            dist <= self.window.min(n) * d && dist % d == 0
        };
        match pass {
            Pass::Local => local && (band() || self.is_global(b, j)),
            Pass::GlobalRows => self.is_global(b, i),
            Pass::LocalBand => local && band() && !self.is_global(b, j),
            Pass::GlobalCols => local && self.is_global(b, j),
        }
    }
}
