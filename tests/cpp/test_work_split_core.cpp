// Unit tests of how the CUDA kernels split their work among blocks, run by
// ctest: multi_tensor's tiles (csrc/core/multi_tensor.h) map back to the tensor
// and block a direct walk over the tensors gives; masked_whiten's parts
// (csrc/core/masked.h) cover the values exactly, within the block limit.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "expect_int.h"
#include "../../csrc/core/masked.h"
#include "../../csrc/core/multi_tensor.h"

namespace {

using rlk_test::expect;

// Tiles listed tensor by tensor, block by block: the truth tile_owner must find.
void check_layout(const std::vector<int64_t>& numels, int64_t tile) {
  const int count = static_cast<int>(numels.size());
  std::vector<int64_t> first(count + 1, -1);
  const int64_t tiles = rlk::tile_starts(numels.data(), count, tile, first.data());
  expect(first[count] == tiles, "first[count] is the total", first[count], tiles);
  int64_t walked = 0;
  for (int t = 0; t < count; ++t) {
    expect(first[t] == walked, "first tile of a tensor", t, first[t]);
    for (int64_t block = 0; block * tile < numels[t]; ++block, ++walked) {
      const int owner = rlk::tile_owner(first.data(), count, walked);
      expect(owner == t, "owner of a tile", walked, owner);
      expect(walked - first[owner] == block, "block within its tensor", walked, walked - first[owner]);
    }
  }
  expect(walked == tiles, "tiles walked", walked, tiles);
}

void test_tile_owner() {
  const int64_t tile = 1024;
  check_layout({1}, tile);
  check_layout({1024}, tile);
  check_layout({1025}, tile);
  check_layout({0, 5, 0}, tile);  // empty tensors own no tile, at either end too
  check_layout({0, 0, 3000, 0, 0, 1, 0}, tile);
  check_layout({0}, tile);
  std::mt19937 rng(3);
  for (int count : {2, 3, 7, 48, 127, 128, 129, 1000}) {
    std::vector<int64_t> numels(count);
    for (auto& n : numels) {
      const unsigned kind = rng() % 4;
      n = kind == 0 ? 0 : kind == 1 ? int64_t(rng() % 3) : kind == 2 ? int64_t(rng() % 5000) : int64_t(rng() % 70001);
    }
    check_layout(numels, tile);
    check_layout(numels, 7);  // tiles smaller than most tensors
  }
}

void test_whiten_parts() {
  for (int64_t n : {int64_t(1), int64_t(8191), int64_t(8192), int64_t(8193), int64_t(1000000),
                    rlk::kWhitenTile * rlk::kWhitenMaxParts, rlk::kWhitenTile * rlk::kWhitenMaxParts + 1,
                    int64_t(3) << 33}) {
    const int64_t size = rlk::whiten_part_size(n), parts = rlk::whiten_parts(n);
    expect(size % rlk::kWhitenTile == 0 && size > 0, "part size a multiple of the tile", n, size);
    expect(parts >= 1 && parts <= rlk::kWhitenMaxParts, "parts within the block limit", n, parts);
    expect((parts - 1) * size < n && parts * size >= n, "parts cover the values, none empty", n, parts);
  }
  expect(rlk::whiten_parts(0) == 0, "no part for no value", 0, rlk::whiten_parts(0));
}

}  // namespace

int main() {
  test_tile_owner();
  test_whiten_parts();
  return rlk_test::finish("work split core");
}
