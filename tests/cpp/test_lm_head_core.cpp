// Unit tests of the lm-head tile rules (csrc/core/lm_head.h), run by ctest: the balanced
// token chunks, the tiles a budget gives, and when a forward keeps its tiles.  Python
// reads the same functions through rlkernels._C (tests/test_linear_logprobs.py).
#include <cstdint>
#include <cstdio>

#include "expect_int.h"
#include "../../csrc/core/lm_head.h"

namespace {

using rlk_test::expect;

}  // namespace

int main() {
  using namespace rlk::lm_head;
  // a given chunk size is balanced: 4 chunks of 25 rather than 30, 30, 30, 10
  expect(chunk_rows(100, 10, 30, kChunkBytes) == 25, "balanced chunk", chunk_rows(100, 10, 30, kChunkBytes), 25);
  expect(chunk_rows(100, 10, 1000, kChunkBytes) == 100, "chunk capped at n", chunk_rows(100, 10, 1000, kChunkBytes),
         100);
  expect(chunk_rows(0, 10, 0, kChunkBytes) == 1, "no rows", chunk_rows(0, 10, 0, kChunkBytes), 1);
  // from the budget: within it, and a multiple of kGemmRows once above kGemmRows
  for (int64_t n : {1, 15, 17, 2048, 10000, 100000}) {
    for (int64_t vocab : {300, 8192, 50257}) {
      const int64_t rows = chunk_rows(n, vocab, 0, kChunkBytes);
      expect(rows * vocab * 4 <= kChunkBytes || rows == 1, "within the budget", rows, vocab);
      expect(rows <= kGemmRows || rows % kGemmRows == 0, "a multiple of kGemmRows", rows, n);
    }
  }
  const auto [tokens, block] = tiles(10, 300, kChunkBytes);
  expect(tokens == 10 && block == 300, "a small problem is one tile", tokens, block);
  const int64_t wide_block = tiles(2048, 50257, kChunkBytes).second;
  expect(wide_block == kVocabBlock, "vocabulary blocks", wide_block, kVocabBlock);
  expect(padded_rows(0) == 0 && padded_rows(1) == kGemmRows && padded_rows(17) == 2 * kGemmRows, "padded rows",
         padded_rows(17), 2 * kGemmRows);
  // 18 rows in chunks of 16 hold 32 padded rows
  expect(keeps_tiles(18, 1000, 16, false, 32 * 1000 * 4), "keeps what fits", 18, 1000);
  expect(!keeps_tiles(18, 1000, 16, false, 32 * 1000 * 4 - 1), "not beyond the budget", 18, 1000);
  expect(!keeps_tiles(18, 1000, 16, true, int64_t{1} << 40), "never with fixed tiles", 18, 1000);
  return rlk_test::finish("lm_head core");
}
