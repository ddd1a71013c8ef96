//! Tiers (fast/smart/main local, code/reason cloud), model resolution and fallback policy.
