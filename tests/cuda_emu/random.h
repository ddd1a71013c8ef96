// The test programs' random numbers: xorshift64 from a fixed seed per program, so a failure
// repeats.
#pragma once
#include <cstdint>

struct Random {
  uint64_t state;

  uint32_t next_u32() { return (uint32_t)(step() >> 16); }
  // Uniform in [0, 1).
  double uniform() { return (double)(step() >> 11) / (double)(1ull << 53); }

 private:
  uint64_t step() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
};
