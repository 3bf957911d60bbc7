// Portable dense MHA prefill forward, 4 warps x 32 query rows ("4x32", FA2's
// layout). Included by kernel.cuh after the masking policies and tile copies it
// shares with the 16-rows-per-warp kernel; same instructions (mma.sync m16n8k16,
// ldmatrix, cp.async, shuffles), same numerics (base-2 online softmax on raw
// scores, one step per 64-key tile, P rounded to the input dtype, fixed reduction
// order: bit-identical reruns), same grid (x = query blocks of 128 rows, reversed
// when causal; y = query head; z = sequence) and the same bounds handling.
//
// Why: with 16 rows per warp every warp reads the whole K and V tile through
// ldmatrix for 8 MMAs per fragment pair; with 32 rows (two m16 slabs) each K/V
// fragment feeds both slabs, halving the K/V ldmatrix traffic per MMA. Q fragments
// are re-read from shared memory per k-step (2 ldmatrix.x4 per 16 MMAs) instead of
// being held in registers: O (2 x 16 x d_v fp32) takes 128 registers at d = 128 and
// S (2 x 16 x 64 fp32) 64 more. Fitting both in 255 registers without spills took:
// the scores written by a first MMA with C = 0 (no zeroed accumulators live across
// the K/V copies), the running max kept scaled (max * c, one register per row, no
// separate exponent reference), CTA-uniform loop values (K/V head pointers, the
// mask, the first masked tile) in shared memory, per-thread copy addresses
// recomputed each tile from a volatile tid read, only the highest key tile copied
// with bounds checks (every lower one is full), and a P.V schedule per target
// (kChunkedPV below).
//
// Shared memory (bytes, config.h WideConfig; rows XOR-swizzled in 16-byte chunks):
//   [0, 128*d_qk*2)          Q tile, read by every tile's S = Q K^T
//   [stage0, +stage)         stage 0: K tile [64][d_qk], V tile [64][d_v]
//   [stage1, +stage)         stage 1 (d_qk <= 128; d = 192 has one stage)
//   [scalars, +64)           CtaScalars (K/V head pointers, first masked tile, mask)
//   [0, 128*d_v*2)           O staging, aliased on Q after the last tile
//   d = 128: 32768 + 2 x 32768 + 64 = 98368 B; d = 64: 16384 + 2 x 16384 + 64 = 49216 B;
//   d = 192: 49152 + 40960 + 64 = 90176 B.
//
// Barrier / cp.async protocol (key tiles from the last one down to 0; tile n lives
// in stage n % 2):
//   prologue: cp.async Q -> commit; cp.async K,V of tile T-1 (zero-filled past s_k)
//             -> stage (T-1) % 2 -> commit; thread 0 writes CtaScalars; if
//             softmax_scale < 0: wait_group 1, then each thread negates the Q chunks
//             it copied itself (its own cp.async writes are visible to it).
//   iteration (tile n): wait_group 0; __syncthreads (tile n, and at the first
//             iteration Q and CtaScalars, visible to all; every warp done with tile
//             n+1, so stage (n-1) % 2 is free); cp.async K,V of tile n-1 (full, no
//             bounds check) -> stage (n-1) % 2 -> commit; S = Q K^T for both slabs
//             and all 64 keys, mask, one online-softmax step, O += P V.
//             One stage (d = 192): the copy of tile n-1 is issued at the end of the
//             iteration instead, after a second __syncthreads (every warp done
//             with tile n); the other CTA on the SM computes while it lands.
//   epilogue: __syncthreads (no warp reads Q/K/V any more, no copy in flight);
//             each warp stages its own 32 rows of O, __syncwarp, 16-byte stores.
#pragma once

namespace flash_mla::portable::dense_fwd {

// D = A * B (C = 0): the first k-step of S = Q K^T. Writing S without reading it
// lets no zero-initialised accumulator be live before the tile's first MMA (the
// compiler hoisted the zeroing above the K/V copies, whose address temporaries
// then pushed the 64-score tile into spills).
template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16_zero_c(float (&d)[4], const uint32_t (&a)[4],
                                                    const uint32_t (&b)[2]) {
  const float z = 0.f;
  if constexpr (std::is_same<Elem, BF16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z));
  }
}

// threadIdx.x read through volatile asm: the compiler can neither hoist it nor the
// per-thread address arithmetic built on it out of the tile loop, where the
// hoisted 64-bit offsets would sit in registers (or spill) through every tile.
__device__ __forceinline__ int thread_index_in_loop() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  return tid;
}

// CTA-uniform values of the tile loop that live in shared memory (see the kernel).
template <typename Mask, typename Storage>
struct CtaScalars {
  const Storage* k_head;  // K and V of this sequence and kv head, row 0
  const Storage* v_head;
  int first_masked;  // tiles >= this one need per-element masking
  Mask mask;
};

template <typename Elem, int kDQK, int kDV, bool kIsCausal>
__global__ void __launch_bounds__(128, 2)
    dense_prefill_fwd_4x32_kernel(const __grid_constant__ DensePrefillFwdParams params) {
  using Cfg = WideConfig<kDQK, kDV>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kSlabs = Cfg::kSlabs;
  using Storage = typename Elem::Storage;
  using Mask = typename std::conditional<kIsCausal, CausalMask, NoMask>::type;
  static_assert(sizeof(CtaScalars<Mask, Storage>) <= Cfg::kScalarBytes,
                "CtaScalars must fit config.h's kScalarBytes");
  constexpr int kKSteps = kDQK / 16;
  constexpr int kNTilesO = kDV / 8;
  constexpr int kNTilesS = kBlockN / 8;  // n-tiles of S per tile
  constexpr int kPSteps = kBlockN / 16;  // k-steps of O += P V per tile
  // k-steps of S = Q K^T unrolled 2 (after the peeled first one): 4 and 7 spilled.
  constexpr int kKStepUnroll = 2;
  // How P.V is interleaved with the exponentials (same operations in the same order
  // per accumulator either way, so the same bits). Each target gets the one that
  // ptxas compiles without spills (the other spills there; docs/mha_fwd.md):
  // sm_100/sm_120 take "chunked" (each 16-key chunk's P feeds P.V at once); sm_80 ..
  // sm_90 convert all 64 keys first and make the O rescale wait for the row sums.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
  constexpr bool kChunkedPV = true;
#else
  constexpr bool kChunkedPV = false;
#endif

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = cvta_shared(smem);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  // Sequence bounds, clamped to the tensors (as in kernel.cuh).
  const int seq = blockIdx.z;
  const int q_start = min(max(params.cu_seqlens_q[seq], 0), params.total_q);
  const int s_q = min(max(params.cu_seqlens_q[seq + 1], q_start), params.total_q) - q_start;
  const int m_block = kIsCausal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int m0 = m_block * kBlockM;
  if (m0 >= s_q) return;
  const int k_start = min(max(params.cu_seqlens_k[seq], 0), params.total_k);
  const int s_k = min(max(params.cu_seqlens_k[seq + 1], k_start), params.total_k) - k_start;

  const int head = blockIdx.y;
  const int kv_head = head / (params.h_q / params.h_k);
  const Storage* k_head = static_cast<const Storage*>(params.k) +
                          static_cast<int64_t>(k_start) * params.k_row_stride +
                          static_cast<int64_t>(kv_head) * params.k_head_stride;
  const Storage* v_head = static_cast<const Storage*>(params.v) +
                          static_cast<int64_t>(k_start) * params.v_row_stride +
                          static_cast<int64_t>(kv_head) * params.v_head_stride;
  const Storage* q_head = static_cast<const Storage*>(params.q) +
                          static_cast<int64_t>(q_start + m0) * params.q_row_stride +
                          static_cast<int64_t>(head) * params.q_head_stride;

  const Mask mask(s_q, s_k, m0, kBlockM);
  const int num_tiles = mask.num_tiles();
  const int num_masked = mask.num_masked();

  // Negative scale: Q negated once (in shared memory here), |c| used; see kernel.cuh.
  const bool negate_q = params.softmax_scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(params.softmax_scale_log2), 1.17549435e-38f);
  const int g = lane / 4;
  const int t = lane % 4;
  // Accumulator rows of this thread in slab m: row0 + 16 m and row0 + 16 m + 8,
  // row0 = m0 + 32 warp + g (computed where used, to keep it out of the loop's registers).

  float o_acc[kSlabs][kNTilesO][4];
#pragma unroll
  for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
    for (int i = 0; i < kNTilesO; ++i) {
      o_acc[m][i][0] = o_acc[m][i][1] = o_acc[m][i][2] = o_acc[m][i][3] = 0.f;
    }
  }
  // row_max: running max of the raw scores, kept scaled (max * c, c > 0; rounding
  // is monotonic, so fmax(M c, m c) == fmax(M, m) c bit for bit), used directly as
  // the exponent reference: p = 2^(s c - row_max). It starts at -FLT_MAX, not -inf:
  // a row that has seen no visible key then gets 2^(-inf - (-FLT_MAX)) = 0, never
  // NaN, without a separate reference register, and since any finite scaled score
  // is >= -FLT_MAX, row_max is the true max once the row sum is non-zero (lse
  // below). row_sum: this thread's partial sums, quad-reduced in the epilogue.
  float row_max[kSlabs][2], row_sum[kSlabs][2];
#pragma unroll
  for (int m = 0; m < kSlabs; ++m) {
    row_max[m][0] = row_max[m][1] = -3.40282347e38f;  // -FLT_MAX
    row_sum[m][0] = row_sum[m][1] = 0.f;
  }

  if (num_tiles > 0) {
    // ---- prologue: Q, and the highest K/V tile (the only one that can be partial:
    // tiles below it end at or before s_k), with zero-fill past s_k ----
    load_tile_async<kBlockM, kDQK, kThreads>(smem_base, q_head, params.q_row_stride, 0, s_q - m0,
                                             tid);
    cp_async_commit();
    {
      const int first = (num_tiles - 1) * kBlockN;
      const uint32_t stage_smem =
          smem_base + Cfg::kStage0Offset + ((num_tiles - 1) & 1) * Cfg::kStageStride;
      load_tile_async<kBlockN, kDQK, kThreads>(stage_smem, k_head, params.k_row_stride, first,
                                               s_k - first, tid);
      load_tile_async<kBlockN, kDV, kThreads>(stage_smem + Cfg::kKTileBytes, v_head,
                                              params.v_row_stride, first, s_k - first, tid);
      cp_async_commit();
    }
    // CTA-wide scalars that only masked tiles need, kept in shared memory rather
    // than in registers through the tile loop (written before the loop's first
    // barrier, read after it).
    if (tid == 0) {
      auto* scalars = reinterpret_cast<CtaScalars<Mask, Storage>*>(smem + Cfg::kScalarOffset);
      scalars->k_head = k_head;
      scalars->v_head = v_head;
      scalars->first_masked = num_tiles - num_masked;
      scalars->mask = mask;
    }
    if (negate_q) {
      cp_async_wait<1>();
      // The same chunk mapping as load_tile_async: each thread flips the sign bits
      // of the chunks it copied (zero-filled rows become -0, never read as output).
      constexpr int kChunksPerRow = kDQK / 8;
#pragma unroll
      for (int j = 0; j < kBlockM * kChunksPerRow / kThreads; ++j) {
        const int idx = tid + j * kThreads;
        uint4* chunk = reinterpret_cast<uint4*>(
            smem + swizzled_offset<kDQK>(idx / kChunksPerRow, (idx % kChunksPerRow) * 8));
        uint4 v = *chunk;
        v.x ^= 0x80008000u;
        v.y ^= 0x80008000u;
        v.z ^= 0x80008000u;
        v.w ^= 0x80008000u;
        *chunk = v;
      }
    }

    // In-loop K/V copies: every tile below the highest is full, so no bounds check
    // and no zero-fill. Each thread copies rows tid / (d / 8) + j * (128 / (d / 8))
    // of its chunk column. Addresses are rebuilt per tile from the head bases in
    // shared memory and a fresh tid read (hoisted, the per-thread 64-bit offsets
    // stayed live through the loop and spilled).
    constexpr int kKChunksPerRow = kDQK / 8;
    constexpr int kVChunksPerRow = kDV / 8;
    constexpr int kKRowsPerStep = kThreads / kKChunksPerRow;
    constexpr int kVRowsPerStep = kThreads / kVChunksPerRow;
    auto issue_full_kv = [&](int tile, uint32_t stage_smem) {
      const int copy_tid = thread_index_in_loop();
      // K/V head bases from shared memory (CTA-uniform, see CtaScalars); this
      // thread's row and chunk offsets are recomputed from tid.
      const CtaScalars<Mask, Storage>& scalars =
          *reinterpret_cast<const CtaScalars<Mask, Storage>*>(smem + Cfg::kScalarOffset);
      const int k_row0 = tile * kBlockN + copy_tid / kKChunksPerRow;
      const int v_row0 = tile * kBlockN + copy_tid / kVChunksPerRow;
      const Storage* k_src = scalars.k_head + static_cast<int64_t>(k_row0) * params.k_row_stride +
                             (copy_tid % kKChunksPerRow) * 8;
      const Storage* v_src = scalars.v_head + static_cast<int64_t>(v_row0) * params.v_row_stride +
                             (copy_tid % kVChunksPerRow) * 8;
      // Rows per step are multiples of 8: every row of a thread has the same swizzle.
      const uint32_t k_dst = stage_smem + swizzled_offset<kDQK>(copy_tid / kKChunksPerRow,
                                                                (copy_tid % kKChunksPerRow) * 8);
      const uint32_t v_dst =
          stage_smem + Cfg::kKTileBytes +
          swizzled_offset<kDV>(copy_tid / kVChunksPerRow, (copy_tid % kVChunksPerRow) * 8);
      if constexpr (kThreads % kKChunksPerRow == 0) {
#pragma unroll
        for (int j = 0; j < kBlockN / kKRowsPerStep; ++j) {
          cp_async_16_zfill(k_dst + j * kKRowsPerStep * (kDQK * 2),
                            k_src + static_cast<int64_t>(j * kKRowsPerStep) * params.k_row_stride,
                            true);
        }
      } else {
        // d = 192: 24 chunks per row do not divide 128 threads. Each thread copies
        // chunk tid % 8 of each 8-chunk group of rows tid / 8 + 16 j: 16 rows per
        // step (a multiple of 8, so one swizzle phase), and since the swizzle only
        // flips a chunk's low 3 bits, group c sits 128 B after group 0 in every row.
        static_assert(kKChunksPerRow % 8 == 0 && kBlockN % (kThreads / 8) == 0, "K groups");
        constexpr int kRows = kThreads / 8;
        const int row = copy_tid / 8, chunk = copy_tid % 8;
        const Storage* src = scalars.k_head +
                             static_cast<int64_t>(tile * kBlockN + row) * params.k_row_stride +
                             chunk * 8;
        const uint32_t dst = stage_smem + swizzled_offset<kDQK>(row, chunk * 8);
#pragma unroll
        for (int j = 0; j < kBlockN / kRows; ++j) {
#pragma unroll
          for (int c = 0; c < kKChunksPerRow / 8; ++c) {
            cp_async_16_zfill(dst + j * kRows * (kDQK * 2) + c * 128,
                              src + static_cast<int64_t>(j * kRows) * params.k_row_stride + c * 64,
                              true);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kBlockN / kVRowsPerStep; ++j) {
        cp_async_16_zfill(v_dst + j * kVRowsPerStep * (kDV * 2),
                          v_src + static_cast<int64_t>(j * kVRowsPerStep) * params.v_row_stride,
                          true);
      }
      cp_async_commit();
    };

    // ldmatrix lane offsets (see kernel.cuh). Q: slab 0 rows 32w + (lane & 15);
    // slab 1 is 16 rows further, which leaves the swizzle (row % 8) unchanged.
    // Chunk 2j + bit of a lane's row sits at ((2j) ^ x) * 16 with x = bit ^ (lane & 7)
    // (2j's low bit is 0, so this equals kernel.cuh's off[j % 4] + (j / 4) * 128).
    // Only a row base and x are kept per operand, not four offsets: at 32 rows per
    // warp every register counts (four offsets per operand spilled on sm_90).
    const uint32_t q_row = smem_base + (warp * 32 + (lane & 15)) * (kDQK * 2);
    const uint32_t k_row = ((lane & 7) + ((lane >> 4) & 1) * 8) * (kDQK * 2);
    const uint32_t v_row = ((lane & 7) + ((lane >> 3) & 1) * 8) * (kDV * 2);
    const uint32_t x_qv = (lane >> 4) ^ (lane & 7);
    const uint32_t x_k = ((lane >> 3) & 1) ^ (lane & 7);

    // Tile n sits in stage n % 2 (the prologue put the highest one there).
    for (int tile = num_tiles - 1; tile >= 0; --tile) {
      cp_async_wait<0>();
      __syncthreads();
      const uint32_t k_smem = smem_base + Cfg::kStage0Offset + (tile & 1) * Cfg::kStageStride;
      const uint32_t v_smem = k_smem + Cfg::kKTileBytes;
      if (Cfg::kStages == 2 && tile > 0) {
        issue_full_kv(tile - 1,
                      smem_base + Cfg::kStage0Offset + ((tile - 1) & 1) * Cfg::kStageStride);
      }

      // S = Q K^T for both slabs and all 64 keys (64 fp32 registers); every K
      // fragment feeds two MMAs.
      float s[kSlabs][kNTilesS][4];
      auto s_kstep = [&](int ks, auto first_tag) {
        uint32_t a[kSlabs][4];
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
          ldmatrix_x4(a[m], q_row + ((2 * ks) ^ x_qv) * 16 + m * 16 * (kDQK * 2));
        }
#pragma unroll
        for (int np = 0; np < kNTilesS / 2; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, k_smem + k_row + ((2 * ks) ^ x_k) * 16 + np * 16 * (kDQK * 2));
          const uint32_t b_lo[2] = {b[0], b[1]};
          const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
          for (int m = 0; m < kSlabs; ++m) {
            if (decltype(first_tag)::value) {
              mma_m16n8k16_zero_c<Elem>(s[m][2 * np], a[m], b_lo);
              mma_m16n8k16_zero_c<Elem>(s[m][2 * np + 1], a[m], b_hi);
            } else {
              mma_m16n8k16<Elem>(s[m][2 * np], a[m], b_lo);
              mma_m16n8k16<Elem>(s[m][2 * np + 1], a[m], b_hi);
            }
          }
        }
      };
      s_kstep(0, std::true_type{});
#pragma unroll kKStepUnroll
      for (int ks = 1; ks < kKSteps; ++ks) s_kstep(ks, std::false_type{});

      // Mask (only the tiles from first_masked up), then one online-softmax step
      // for the 64 keys (base 2, one FFMA per score).
      const CtaScalars<Mask, Storage>& scalars =
          *reinterpret_cast<const CtaScalars<Mask, Storage>*>(smem + Cfg::kScalarOffset);
      if (tile >= scalars.first_masked) {
        const Mask tile_mask = scalars.mask;
        const int row0 = m0 + warp * 32 + g;
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
          for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = tile * kBlockN + nt * 8 + 2 * t + (e & 1);
              const int row = row0 + m * 16 + (e >> 1) * 8;
              if (!tile_mask.visible(row, col)) s[m][nt][e] = kNegInf;
            }
          }
        }
      }
      float correction[kSlabs][2];
#pragma unroll
      for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float tile_max = fmaxf(s[m][0][2 * r], s[m][0][2 * r + 1]);
#pragma unroll
          for (int nt = 1; nt < kNTilesS; ++nt) {
            tile_max = fmaxf(tile_max, fmaxf(s[m][nt][2 * r], s[m][nt][2 * r + 1]));
          }
          const float new_max = fmaxf(row_max[m][r], quad_max(tile_max) * scale_log2);
          // Exactly 1 when the max did not move. With scaled maxima the difference
          // is an exact 0 then; the select keeps it independent of ex2.approx's
          // value at 0 (a factor of 1 + 1e-7 per step compounds over long rows and
          // moves lse out of its tolerance).
          correction[m][r] =
              new_max == row_max[m][r] ? 1.f : exp2_approx(row_max[m][r] - new_max);
          row_max[m][r] = new_max;
          row_sum[m][r] *= correction[m][r];
        }
      }
      // Per 16-key chunk kk: p = 2^(s c - max c), rounded to the input dtype and
      // packed as the A fragment of P.V (the C fragments of n-tiles 2kk, 2kk+1 are
      // the A fragment of k-step kk), summed in fp32 into this thread's row sums.
      uint32_t p_frag[kSlabs][kPSteps][4];
      auto exp_chunk = [&](int kk) {
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
          float p[2][4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              p[h][e] = exp2_approx(fmaf(s[m][2 * kk + h][e], scale_log2, -row_max[m][e >> 1]));
            }
            row_sum[m][0] += p[h][0] + p[h][1];
            row_sum[m][1] += p[h][2] + p[h][3];
          }
          p_frag[m][kk][0] = pack_float2<Elem>(p[0][0], p[0][1]);
          p_frag[m][kk][1] = pack_float2<Elem>(p[0][2], p[0][3]);
          p_frag[m][kk][2] = pack_float2<Elem>(p[1][0], p[1][1]);
          p_frag[m][kk][3] = pack_float2<Elem>(p[1][2], p[1][3]);
        }
      };
      // O += P V for chunk kk's 16 keys; each V fragment feeds both slabs.
      auto pv_chunk = [&](int kk) {
#pragma unroll
        for (int dp = 0; dp < kNTilesO / 2; ++dp) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_smem + v_row + ((2 * dp) ^ x_qv) * 16 + kk * 16 * (kDV * 2));
          const uint32_t b_lo[2] = {b[0], b[1]};
          const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
          for (int m = 0; m < kSlabs; ++m) {
            mma_m16n8k16<Elem>(o_acc[m][2 * dp], p_frag[m][kk], b_lo);
            mma_m16n8k16<Elem>(o_acc[m][2 * dp + 1], p_frag[m][kk], b_hi);
          }
        }
      };
      // O rescaled once per 64 keys, before the tile's first P.V MMA.
      auto rescale_o = [&](const float (&factor)[kSlabs][2]) {
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
#pragma unroll
          for (int nt = 0; nt < kNTilesO; ++nt) {
            o_acc[m][nt][0] *= factor[m][0];
            o_acc[m][nt][1] *= factor[m][0];
            o_acc[m][nt][2] *= factor[m][1];
            o_acc[m][nt][3] *= factor[m][1];
          }
        }
      };
      if (kChunkedPV) {
        rescale_o(correction);
#pragma unroll
        for (int kk = 0; kk < kPSteps; ++kk) {
          exp_chunk(kk);
          pv_chunk(kk);
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kPSteps; ++kk) exp_chunk(kk);
        // correction + 0 * row_sum: the same factor for a finite sum (a NaN sum
        // makes the row NaN either way), but ptxas must finish the row sums before
        // the rescale and so before P.V; otherwise it kept the 64 fp32 exponentials
        // live through P.V (only the sums still needed them) and spilled.
        float factor[kSlabs][2];
#pragma unroll
        for (int m = 0; m < kSlabs; ++m) {
          factor[m][0] = fmaf(0.f, row_sum[m][0], correction[m][0]);
          factor[m][1] = fmaf(0.f, row_sum[m][1], correction[m][1]);
        }
        rescale_o(factor);
#pragma unroll
        for (int kk = 0; kk < kPSteps; ++kk) pv_chunk(kk);
      }
      if (Cfg::kStages == 1 && tile > 0) {
        __syncthreads();  // every warp is done with the one stage: refill it
        issue_full_kv(tile - 1, smem_base + Cfg::kStage0Offset);
      }
    }
    __syncthreads();  // nobody reads Q/K/V any more: staging may overwrite Q
  }

  // ---- epilogue: rows that saw no key get out = 0 and lse = +inf ----
  // Sequence start and length re-read (cached loads) rather than kept live through
  // the tile loop: registers are the limit of this layout.
  {
    const int q_start = min(max(params.cu_seqlens_q[seq], 0), params.total_q);
    const int s_q = min(max(params.cu_seqlens_q[seq + 1], q_start), params.total_q) - q_start;
    const int m0 =
        (kIsCausal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : blockIdx.x) * kBlockM;
    const int row0 = m0 + warp * 32 + g;
    Storage* out_head = static_cast<Storage*>(params.out) +
                        static_cast<int64_t>(q_start + m0) * params.out_row_stride +
                        static_cast<int64_t>(head) * params.out_head_stride;
    float* lse_head = params.lse + static_cast<int64_t>(head) * params.lse_head_stride + q_start;
#pragma unroll
    for (int m = 0; m < kSlabs; ++m) {
      float inv_sum[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[m][r]);
        inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
        constexpr float kLn2 = 0.69314718055994530942f;
        const float lse = sum > 0.f ? (row_max[m][r] + __log2f(sum)) * kLn2
                                    : __int_as_float(0x7f800000);
        const int row = row0 + m * 16 + 8 * r;
        if (t == 0 && row < s_q) lse_head[row] = lse;
      }
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t packed = pack_float2<Elem>(o_acc[m][nt][2 * r] * inv_sum[r],
                                                    o_acc[m][nt][2 * r + 1] * inv_sum[r]);
          const int row = warp * 32 + m * 16 + g + 8 * r;
          *reinterpret_cast<uint32_t*>(smem + swizzled_offset<kDV>(row, nt * 8 + 2 * t)) = packed;
        }
      }
    }
    __syncwarp();

    constexpr int kChunksPerRow = kDV / 8;
#pragma unroll
    for (int j = 0; j < 32 * kChunksPerRow / 32; ++j) {
      const int idx = lane + 32 * j;
      const int row = warp * 32 + idx / kChunksPerRow;
      const int col = (idx % kChunksPerRow) * 8;
      if (m0 + row < s_q) {
        const uint4 value = *reinterpret_cast<const uint4*>(smem + swizzled_offset<kDV>(row, col));
        *reinterpret_cast<uint4*>(out_head + static_cast<int64_t>(row) * params.out_row_stride +
                                  col) = value;
      }
    }
  }
}

template <typename Elem, int kDQK, int kDV, bool kIsCausal>
void launch_dense_prefill_fwd_4x32(const DensePrefillFwdParams& params) {
  using Cfg = WideConfig<kDQK, kDV>;
  auto kernel = dense_prefill_fwd_4x32_kernel<Elem, kDQK, kDV, kIsCausal>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  const dim3 grid(num_m_blocks(params.max_seqlen_q, Cfg::kBlockM), params.h_q, params.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, params.stream>>>(params);
}

}  // namespace flash_mla::portable::dense_fwd
