//! Placement of a network's activations in one buffer by liveness: tensors that are never alive
//! at the same time share memory, so peak memory is the largest live set, not the sum of all
//! activations. Used by the fused GPU path.

/// Places tensors given as `(bytes, first use, last use)` (op indices, inclusive) in one slab.
/// Returns each tensor's byte offset and the slab's size. Greedy, largest first, lowest offset
/// that does not overlap a placed tensor alive at the same time; offsets are 256-byte aligned.
pub fn plan_slab(tensors: &[(usize, usize, usize)]) -> (Vec<usize>, usize) {
    const ALIGN: usize = 256;
    let aligned = |b: usize| b.div_ceil(ALIGN) * ALIGN;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].0));
    let mut offsets = vec![0; tensors.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut total = 0;
    for i in order {
        let (size, first, last) = tensors[i];
        let size = aligned(size);
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| tensors[j].1 <= last && first <= tensors[j].2)
            .map(|&j| (offsets[j], offsets[j] + aligned(tensors[j].0)))
            .collect();
        busy.sort();
        let mut at = 0;
        for (start, end) in busy {
            if at + size <= start {
                break;
            }
            at = at.max(end);
        }
        offsets[i] = at;
        total = total.max(at + size);
        placed.push(i);
    }
    (offsets, total)
}

#[cfg(test)]
mod tests {
    use super::plan_slab;

    #[test]
    fn dead_tensors_share_memory() {
        // a: ops 0-1, b: ops 1-2, c: ops 2-3. a and c are never alive together.
        let (offsets, total) = plan_slab(&[(1024, 0, 1), (1024, 1, 2), (1024, 2, 3)]);
        assert_eq!(total, 2048);
        assert_eq!(offsets[0], offsets[2]);
        assert_ne!(offsets[0], offsets[1]);
    }

    #[test]
    fn live_tensors_never_overlap() {
        // A ResNet-like chain with residuals: check every pair alive together is disjoint.
        let t: Vec<(usize, usize, usize)> = vec![
            (4000, 0, 1),
            (1000, 1, 3),
            (1000, 2, 3),
            (1000, 3, 5),
            (1000, 4, 5),
            (500, 5, 6),
            (300, 6, 7),
        ];
        let (off, total) = plan_slab(&t);
        for i in 0..t.len() {
            assert!(off[i] + t[i].0 <= total);
            for j in 0..i {
                let alive_together = t[i].1 <= t[j].2 && t[j].1 <= t[i].2;
                let disjoint = off[i] + t[i].0 <= off[j] || off[j] + t[j].0 <= off[i];
                assert!(!alive_together || disjoint, "{i} and {j} overlap");
            }
        }
        // The 4000-byte stem output dies before the later tensors need room.
        assert!(total < 4000 + 1024 + 1024, "{total}");
    }
}
