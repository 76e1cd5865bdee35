// The lm-head tiles (linear_logprobs, linear_ppo_loss, vocabulary-parallel): how many
// tokens and vocabulary entries one tile of logits holds, and whether a forward keeps
// its tiles for the backward.  Torch-free integer rules, written once: the C++ bodies
// (csrc/lm_head/) use them and Python reads them through rlkernels._C
// (rlkernels/ops/_chunked.py).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>

#include "logprobs.h"

namespace rlk::lm_head {

// Default budget for the logits held at a time, counted in float32.
constexpr int64_t kChunkBytes = int64_t{64} << 20;
// Vocabulary block of the tiles: fixed, so a token's logits come from the same matmul
// shapes and merge in the same order whatever the batch; a multiple of the vocabulary
// chunk, so the tiles fold the whole-row pass's chunks exactly.
constexpr int64_t kVocabBlock = kVocabChunk;
// Row granularity of every lm-head matmul: a BLAS picks its code path (and summation
// order) by the row count, so each matmul runs on a multiple of kGemmRows rows and a
// token's logits are the same bits whatever the batch (docs/numerics.md).
constexpr int64_t kGemmRows = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n rounded up to a multiple of kGemmRows: the rows a logits buffer for n tokens needs.
inline int64_t padded_rows(int64_t n) { return ceil_div(n, kGemmRows) * kGemmRows; }

// Rows per forward chunk: chunk_size when > 0, else as many as fit `budget` bytes of
// float32 logits, balanced so that the last chunk is not a sliver, and then rounded
// down to a multiple of kGemmRows (only the last chunk's matmul needs a padded tail).
inline int64_t chunk_rows(int64_t n, int64_t vocab, int64_t chunk_size, int64_t budget) {
  if (n <= 0) return 1;
  const bool from_budget = chunk_size <= 0;
  if (from_budget) chunk_size = std::max<int64_t>(1, budget / (4 * std::max<int64_t>(vocab, 1)));
  chunk_size = std::max<int64_t>(1, std::min(chunk_size, n));
  const int64_t count = ceil_div(n, chunk_size);
  const int64_t rows = ceil_div(n, count);
  return from_budget && rows > kGemmRows ? rows - rows % kGemmRows : rows;
}

// (token chunk, vocabulary block) within `budget` bytes of float32: blocks of
// kVocabBlock (or the whole vocabulary when smaller), and as many tokens as fit.
inline std::pair<int64_t, int64_t> tiles(int64_t n, int64_t vocab, int64_t budget) {
  n = std::max<int64_t>(n, 1);
  vocab = std::max<int64_t>(vocab, 1);
  const int64_t block = std::min(vocab, kVocabBlock);
  return {chunk_rows(n, block, 0, budget), block};
}

// Whether a forward keeps its tiles for the backward instead of the backward
// recomputing them: when all of them fit the budget at once (padded rows included)
// and the caller did not fix the tile size.  A small problem then does three matmuls
// instead of four, and holds no more logits than chunk_size allows.
inline bool keeps_tiles(int64_t n, int64_t vocab, int64_t chunk, bool fixed, int64_t budget) {
  if (fixed) return false;
  const int64_t rows = (n / chunk) * padded_rows(chunk) + padded_rows(n % chunk);
  return rows * vocab * 4 <= budget;
}

}  // namespace rlk::lm_head
