//! Token sampling: temperature, top-k, top-p, min-p, penalties, seeded RNG.
//! Pure functions over a logits slice; knows nothing of the model, tokenizer or threads.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llm::GenerationParams;

/// Picks the next token from logits. One per request, so a seed replays a whole answer.
pub struct Sampler {
    params: GenerationParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: &GenerationParams) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params: params.clone(), rng }
    }

    /// Choose a token. `recent` is the tail of the sequence so far (prompt and answer), on
    /// which the repeat and presence penalties act; `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        match self.sample_masked(logits, recent, |_| Ok::<(), std::convert::Infallible>(())) {
            Ok(token) => token,
            Err(never) => match never {},
        }
    }

    /// `sample` with a constraint: `mask` sets the logits of forbidden tokens to -inf after
    /// the penalties and before temperature and the top-k/top-p/min-p filters, so only an
    /// allowed token is ever picked (greedy or at any temperature). Its error is returned
    /// and nothing is sampled.
    pub fn sample_masked<E>(
        &mut self,
        logits: &mut [f32],
        recent: &[u32],
        mask: impl FnOnce(&mut [f32]) -> Result<(), E>,
    ) -> Result<u32, E> {
        let window_start = recent.len().saturating_sub(self.params.repeat_last_n);
        apply_penalties(
            logits,
            &recent[window_start..],
            self.params.repeat_penalty,
            self.params.presence_penalty,
        );
        mask(logits)?;
        if self.params.temperature <= 0.0 {
            return Ok(argmax(logits));
        }
        let candidates = filter_candidates(logits, &self.params);
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(token, weight) in &candidates {
            if draw < weight {
                return Ok(token);
            }
            draw -= weight;
        }
        // Rounding can leave `draw` a hair above the last weight: take the last candidate
        // that has any weight (a masked one has none and must never come out).
        let fallback = candidates.iter().rev().find(|c| c.1 > 0.0);
        Ok(fallback.map_or_else(|| argmax(logits), |c| c.0))
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (idx, &value) in logits.iter().enumerate() {
        if value > logits[best] {
            best = idx;
        }
    }
    best as u32
}

/// llama.cpp's penalties: each distinct recent token is divided (positive logit) or
/// multiplied (negative) by `repeat_penalty`, and lowered by `presence_penalty`.
fn apply_penalties(logits: &mut [f32], recent: &[u32], repeat_penalty: f32, presence: f32) {
    if (repeat_penalty == 1.0 || repeat_penalty <= 0.0) && presence == 0.0 {
        return;
    }
    let mut seen: Vec<u32> = recent.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for token in seen {
        let Some(logit) = logits.get_mut(token as usize) else { continue };
        if repeat_penalty > 0.0 && repeat_penalty != 1.0 {
            *logit = if *logit > 0.0 { *logit / repeat_penalty } else { *logit * repeat_penalty };
        }
        *logit -= presence;
    }
}

/// The tokens that survive temperature, top-k, top-p and min-p, with unnormalised
/// probabilities, most likely first.
fn filter_candidates(logits: &[f32], params: &GenerationParams) -> Vec<(u32, f32)> {
    let temperature = params.temperature as f32;
    let mut candidates: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(idx, &l)| (idx as u32, l / temperature)).collect();
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    if params.top_k > 0 && params.top_k < candidates.len() {
        // Linear-time selection first: sorting 150k logits every token would cost more
        // than a small model's whole decode step.
        candidates.select_nth_unstable_by(params.top_k - 1, by_logit_desc);
        candidates.truncate(params.top_k);
    }
    candidates.sort_unstable_by(by_logit_desc);
    let max_logit = candidates.first().map_or(0.0, |c| c.1);
    for candidate in &mut candidates {
        candidate.1 = (candidate.1 - max_logit).exp();
    }
    let total: f32 = candidates.iter().map(|c| c.1).sum();
    if params.top_p > 0.0 && params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = candidates.len();
        for (idx, candidate) in candidates.iter().enumerate() {
            cumulative += candidate.1 / total;
            if cumulative >= params.top_p as f32 {
                keep = idx + 1;
                break;
            }
        }
        candidates.truncate(keep);
    }
    if params.min_p > 0.0 {
        // The first candidate has weight exp(0) = 1, so min-p compares weights directly.
        let threshold = params.min_p as f32;
        let keep = candidates.iter().take_while(|c| c.1 >= threshold).count().max(1);
        candidates.truncate(keep);
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64, min_p: f64) -> GenerationParams {
        GenerationParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(7),
            ..GenerationParams::greedy(16)
        }
    }

    fn kept(logits: &[f32], p: &GenerationParams) -> Vec<u32> {
        filter_candidates(logits, p).into_iter().map(|c| c.0).collect()
    }

    #[test]
    fn greedy_takes_the_argmax_and_ignores_the_rng() {
        let mut sampler = Sampler::new(&GenerationParams::greedy(4));
        assert_eq!(sampler.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
        assert_eq!(argmax(&[1.0, 1.0]), 0);
    }

    #[test]
    fn top_k_keeps_the_k_largest_in_order() {
        let logits = [0.0, 5.0, 1.0, 4.0, 3.0];
        assert_eq!(kept(&logits, &params(1.0, 3, 1.0, 0.0)), vec![1, 3, 4]);
        assert_eq!(kept(&logits, &params(1.0, 0, 1.0, 0.0)).len(), 5);
    }

    #[test]
    fn top_p_stops_once_the_mass_is_reached() {
        // Probabilities ≈ 0.665, 0.245, 0.090: p = 0.8 needs the first two.
        let logits = [2.0, 1.0, 0.0];
        assert_eq!(kept(&logits, &params(1.0, 0, 0.8, 0.0)), vec![0, 1]);
        assert_eq!(kept(&logits, &params(1.0, 0, 0.5, 0.0)), vec![0]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // Relative weights 1, e^-1 ≈ 0.37, e^-3 ≈ 0.05.
        let logits = [3.0, 2.0, 0.0];
        assert_eq!(kept(&logits, &params(1.0, 0, 1.0, 0.1)), vec![0, 1]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0, 0.0];
        let hot = filter_candidates(&logits, &params(10.0, 0, 1.0, 0.0));
        let cold = filter_candidates(&logits, &params(0.1, 0, 1.0, 0.0));
        assert!(hot[1].1 > 0.9, "{hot:?}");
        assert!(cold[1].1 < 1e-4, "{cold:?}");
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let mut logits = [2.0, -2.0, 1.0];
        apply_penalties(&mut logits, &[0, 1, 1], 2.0, 0.5);
        assert_eq!(logits, [0.5, -4.5, 1.0]);
        // Only the last `repeat_last_n` tokens count.
        let mut sampler = Sampler::new(&GenerationParams {
            repeat_penalty: 100.0,
            repeat_last_n: 1,
            ..GenerationParams::greedy(4)
        });
        assert_eq!(sampler.sample(&mut [5.0, 4.0], &[0, 1]), 0);
        assert_eq!(sampler.sample(&mut [5.0, 4.0], &[1, 0]), 1);
    }

    #[test]
    fn a_seed_replays_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut sampler =
                Sampler::new(&GenerationParams { seed: Some(seed), ..params(1.0, 0, 1.0, 0.0) });
            (0..20).map(|_| sampler.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn a_mask_is_applied_after_penalties_and_before_temperature() {
        // Token 0 dominates; the mask forbids it and 3. At temperature 1 with many draws
        // only 1 and 2 ever come out; greedy takes the best allowed one.
        let logits = [9.0f32, 1.0, 2.0, 8.0];
        let forbid = |l: &mut [f32]| {
            l[0] = f32::NEG_INFINITY;
            l[3] = f32::NEG_INFINITY;
            Ok::<(), ()>(())
        };
        let mut sampler = Sampler::new(&params(1.0, 0, 1.0, 0.0));
        for _ in 0..500 {
            let token = sampler.sample_masked(&mut logits.clone(), &[], forbid).unwrap();
            assert!(token == 1 || token == 2, "{token}");
        }
        let mut greedy = Sampler::new(&GenerationParams::greedy(4));
        assert_eq!(greedy.sample_masked(&mut logits.clone(), &[], forbid), Ok(2));
        // With top-k 1 after the mask the best allowed token is the only candidate.
        let mut top1 = Sampler::new(&params(1.0, 1, 1.0, 0.0));
        assert_eq!(top1.sample_masked(&mut logits.clone(), &[], forbid), Ok(2));
        // The mask's error is returned and nothing is sampled.
        let refuse = |_: &mut [f32]| Err("no");
        assert_eq!(greedy.sample_masked(&mut logits.clone(), &[], refuse), Err("no"));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens at 3:1 odds; 4000 draws land near 75%.
        let logits = [3f32.ln(), 0.0];
        let mut sampler = Sampler::new(&params(1.0, 0, 1.0, 0.0));
        let firsts = (0..4000).filter(|_| sampler.sample(&mut logits.clone(), &[]) == 0).count();
        assert!((2800..3200).contains(&firsts), "{firsts}");
    }
}
