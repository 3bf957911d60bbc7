// Portable dense MHA prefill backward, 4-warp CTA (Config4 in config.h). Included
// by kernel.cuh after the tile copies, warp_gemm, softmax_p and ds_from_p it shares
// with the 8-warp kernel; same instructions (mma.sync m16n8k16, ldmatrix, cp.async, RED),
// same grid (x = 64-key blocks, y = kv head, z = sequence), same steps (one 64-row
// query block of one query head of the GQA group), same numerics (compensated
// hi + lo P and dS, config.h) and the same bounds handling.
//
// Why: in the 8-warp kernel a warp owns 16 keys x 32 queries, so P^T and dS^T go
// through shared memory for dV and dK (two tiles, three to five barriers per
// step) and every warp re-reads K, V, Q and dO fragments for small warp tiles. Here
// warp w owns keys 16w .. 16w + 15 across all 64 queries of the step:
//   S^T  = K Q^T, dP^T = V dO^T     16 x 64 per warp, in passes of Config4::kPassM
//                                    queries (A from K / V, B from Q / dO)
//   P^T, dS^T                        in registers (softmax_p, ds_from_p)
//   dV  += P^T dO, dK += dS^T Q      A straight from those registers: the mma C
//                                    layout of two n8 tiles is the A layout of a k16
//                                    step, split into hi + lo on the fly
//   dq_accum += dS K                 dS^T (hi, lo) is the only tile that crosses
//                                    warps; warp w owns queries 32 (w % 2) .. +32 and
//                                    head dims (w / 2) * d_qk / 2 .. +d_qk / 2
// Two barriers per step. Two CTAs share an SM where shared memory allows (H100:
// 2 x 82 KB at d = 128), and their barriers drift apart.
//
// Shared memory: Config4 (K, V resident; Q, dO, lse, delta of the step; dS^T hi and
// lo). d = 128: 4 x 16384 + 2 x 8192 + 512 = 82432 B; d = 64: 49664 B.
//
// Barrier protocol per step:
//   B1  wait for this step's cp.async group, __syncthreads: Q, dO, lse, delta
//       visible; every warp has finished the previous step's dQ (dS^T is free).
//       S^T, dP^T, P^T, dS^T in registers; dS^T hi / lo -> shared memory;
//       dV += P^T dO, dK += dS^T Q (reads Q, dO).
//   B2  __syncthreads: dS^T visible; Q, dO, lse, delta free -> issue the next
//       step's loads, which overlap the dQ product (reads dS^T, K) and its REDs.
// Epilogue: as the 8-warp kernel (stage dK / dV in the K / V tiles, 16-byte stores).
#pragma once

namespace flash_mla::portable::dense_bwd {

// The A fragment (16 rows x k16) of k-step kk from the fp32 C fragments of n8 tiles
// 2kk (c0) and 2kk + 1 (c1) of an accumulator block (common/mma.cuh): hi = the
// values rounded to the input dtype, lo = the rounded residuals (kCompensatedDS).
template <typename Elem>
__device__ __forceinline__ void split_a_fragment(const float (&c0)[4], const float (&c1)[4],
                                                 uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const float x[8] = {c0[0], c0[1], c0[2], c0[3], c1[0], c1[1], c1[2], c1[3]};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    hi[i] = pack_float2<Elem>(x[2 * i], x[2 * i + 1]);
    if constexpr (kCompensatedDS) {
      const float2 h = unpack_float2<Elem>(hi[i]);
      lo[i] = pack_float2<Elem>(x[2 * i] - h.x, x[2 * i + 1] - h.y);
    }
  }
}

// acc[j] += A * B[:, 8j .. 8j + 7], A (16 x 16 kKSteps) held as fp32 accumulators
// a_acc (2 kKSteps n8 tiles; hi + lo when kCompensatedDS), B stored [k][n] in a
// swizzled tile of kBRowElems elements per row from column 0 (read with .trans).
template <typename Elem, int kKSteps, int kNTiles, int kBRowElems>
__device__ __forceinline__ void warp_gemm_areg(float (&acc)[kNTiles][4],
                                               const float (&a_acc)[2 * kKSteps][4],
                                               uint32_t b_tile, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments come two n8 tiles per ldmatrix.x4");
  const int r1 = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c1 = lane >> 4;
  const SwizzledAddr<kBRowElems> b_addr(b_tile, r1, c1);
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t hi[4];
    uint32_t lo[4];
    split_a_fragment<Elem>(a_acc[2 * kk], a_acc[2 * kk + 1], hi, lo);
#pragma unroll
    for (int j = 0; j < kNTiles; j += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr.at(kk * 16, j));
      const uint32_t b_lo[2] = {b[0], b[1]};
      const uint32_t b_hi[2] = {b[2], b[3]};
      mma_m16n8k16<Elem>(acc[j], hi, b_lo);
      mma_m16n8k16<Elem>(acc[j + 1], hi, b_hi);
      if constexpr (kCompensatedDS) {
        mma_m16n8k16<Elem>(acc[j], lo, b_lo);
        mma_m16n8k16<Elem>(acc[j + 1], lo, b_hi);
      }
    }
  }
}

// dq[s][j] += dS[q_row0 + 16 s .., :] * K[:, col0 + 8 j ..] for the two m16 slabs s:
// dS read transposed from dS^T [kBlockN][kBlockM] (hi at ds_tile, lo at ds_lo_tile
// when kCompensatedDS), K read transposed from the [kBlockN][kDQK] K tile. Every K
// fragment feeds both slabs.
template <typename Elem, int kNTiles, int kDQK>
__device__ __forceinline__ void warp_gemm_dq(float (&acc)[2][kNTiles][4], uint32_t ds_tile,
                                             uint32_t ds_lo_tile, int q_row0, uint32_t k_tile,
                                             int col0, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments come two n8 tiles per ldmatrix.x4");
  const int r1 = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c1 = lane >> 4;
  const int r2 = (lane & 7) + (lane >> 4) * 8;
  const int c2 = (lane >> 3) & 1;
  const SwizzledAddr<kBlockM> a_addr(ds_tile, r2, (q_row0 >> 3) + c2);
  const SwizzledAddr<kDQK> b_addr(k_tile, r1, (col0 >> 3) + c1);
  const uint32_t lo_delta = ds_lo_tile - ds_tile;
#pragma unroll
  for (int kk = 0; kk < kBlockN; kk += 16) {
    uint32_t a[2][4];
    uint32_t a_lo[2][4];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      ldmatrix_x4_trans(a[s], a_addr.at(kk, 2 * s));
      if constexpr (kCompensatedDS) ldmatrix_x4_trans(a_lo[s], a_addr.at(kk, 2 * s) + lo_delta);
    }
#pragma unroll
    for (int j = 0; j < kNTiles; j += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr.at(kk, j));
      const uint32_t b_lo[2] = {b[0], b[1]};
      const uint32_t b_hi[2] = {b[2], b[3]};
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        mma_m16n8k16<Elem>(acc[s][j], a[s], b_lo);
        mma_m16n8k16<Elem>(acc[s][j + 1], a[s], b_hi);
        if constexpr (kCompensatedDS) {
          mma_m16n8k16<Elem>(acc[s][j], a_lo[s], b_lo);
          mma_m16n8k16<Elem>(acc[s][j + 1], a_lo[s], b_hi);
        }
      }
    }
  }
}

template <typename Elem, int kDQK, int kDV, typename Mask>
__global__ void __launch_bounds__(k4Threads, 2)
    dense_bwd_main4_kernel(const DensePrefillBwdParams p) {
  using Cfg = Config4<kDQK, kDV>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
  // sm_120 / sm_121 at d = 128: never launched. Two 82 KB CTAs do not fit their 100 KB
  // per SM, so choose_layout never picks this CTA there and the entry refuses
  // FLASH_MLA_DENSE_BWD_WARPS=4 (config.h min_smem_per_sm_4warps); and sm_120f's register
  // allocation spills 24 B at d = 128 (nvcc 13.0). A launch would be a bug: trap (the
  // code below is then unreachable and not emitted). d = 64 (2 x 49664 B) is built.
  if constexpr (!Cfg::kTwoFitSm120) {
    __trap();
    return;
  }
#endif
  using Storage = typename Elem::Storage;
  extern __shared__ __align__(128) uint8_t smem[];

  const KeyBlock kb = KeyBlock::make<Mask>(p);
  if (kb.empty()) return;  // past this sequence's keys: nothing to write
  const int kv_head = kb.kv_head;
  const int q_begin = kb.q_begin, s_q = kb.s_q, s_k = kb.s_k, n0 = kb.n0;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t4 = lane & 3;

  const uint32_t sK = cvta_shared(smem + Cfg::kOffK);
  const uint32_t sV = cvta_shared(smem + Cfg::kOffV);
  const uint32_t sQ = cvta_shared(smem + Cfg::kOffQ);
  const uint32_t sDO = cvta_shared(smem + Cfg::kOffDO);
  const uint32_t sDS = cvta_shared(smem + Cfg::kOffDS);
  const uint32_t sDSLo = cvta_shared(smem + Cfg::kOffDSLo);
  float* s_lse = reinterpret_cast<float*>(smem + Cfg::kOffLse);
  float* s_delta = reinterpret_cast<float*>(smem + Cfg::kOffDelta);
  float* dq_accum = reinterpret_cast<float*>(static_cast<char*>(p.workspace) +
                                             dq_accum_offset(p.total_q, p.h_q));

  load_key_block<kDQK, kDV, k4Threads, Storage>(p, sK, sV, kb, kv_head, tid);

  const StepPlan plan = StepPlan::make<Mask>(p, kb, kv_head);
  const int num_steps = plan.count;

  const int key_row0 = warp * 16;           // S^T, dP^T, dV, dK rows of this warp
  const int q_row0 = (warp & 1) * 32;       // dQ rows (two m16 slabs)
  const int dq_col0 = (warp >> 1) * Cfg::kDQCols;

  constexpr int kPassM = Cfg::kPassM;  // queries per S^T / dP^T pass
  constexpr int kPassTiles = kPassM / 8;
  constexpr int kDVTiles = kDV / 8;
  constexpr int kDKTiles = kDQK / 8;
  constexpr int kDQPassTiles = Cfg::kDQPassCols / 8;
  float acc_dk[kDKTiles][4];
  float acc_dv[kDVTiles][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  if (num_steps > 0) {
    load_query_block<kDQK, kDV, k4Threads, Storage>(p, sQ, sDO, s_lse, s_delta, plan.head(0),
                                                    plan.m0(0), s_q, q_begin, tid);
  }
  cp_async_commit();  // K, V and step 0 in one group

  for (int step = 0; step < num_steps; ++step) {
    const int h = plan.head(step);
    const int m0 = plan.m0(step);
    const int lane_s = opaque(lane);

    cp_async_wait<0>();
    __syncthreads();  // B1

    // The 64 queries in passes of kPassM (Config4): P first, dV from it, then dP and
    // dS, dK from it, so at most two of the pass's four accumulator tiles are live next
    // to the 128 dK / dV accumulator registers at d = 128. K and V fragments are
    // re-read per pass.
#pragma unroll 1
    for (int qc0 = 0; qc0 < kBlockM; qc0 += kPassM) {
      const int lane_h = opaque(lane);  // addresses are recomputed per pass, not held
      float s[kPassTiles][4];
      zero_acc(s);
      warp_gemm<Elem, kDQK, kPassTiles, kDQK, kDQK, false, false>(s, sK, key_row0, sQ, qc0,
                                                                  lane_h);
      softmax_p<Mask, kPassTiles>(s, key_row0, qc0, m0, n0, s_q, s_k, s_lse,
                                  p.softmax_scale_log2, lane);
      // Rows qc0.. of dO / Q: a multiple of 8 rows keeps the swizzle phase.
      warp_gemm_areg<Elem, kPassM / 16, kDVTiles, kDV>(acc_dv, s, sDO + qc0 * kDV * kElemBytes,
                                                       lane_h);
      float dp[kPassTiles][4];
      zero_acc(dp);
      warp_gemm<Elem, kDV, kPassTiles, kDV, kDV, false, false>(dp, sV, key_row0, sDO, qc0,
                                                               opaque(lane));
      ds_from_p<kPassTiles>(s, dp, qc0, s_delta, lane);

      // dS^T for the dQ product (the previous step's dQ finished before B1).
      if constexpr (kCompensatedDS) {
        store_split_to_smem<Elem, kPassTiles>(smem + Cfg::kOffDS, smem + Cfg::kOffDSLo, dp,
                                              key_row0, qc0, lane_h);
      } else {
        store_acc_to_smem<Elem, kPassTiles, kBlockM>(smem + Cfg::kOffDS, dp, key_row0, qc0, 1.f,
                                                     lane_h);
      }
      warp_gemm_areg<Elem, kPassM / 16, kDKTiles, kDQK>(acc_dk, dp, sQ + qc0 * kDQK * kElemBytes,
                                                        opaque(lane));
    }
    __syncthreads();  // B2

    if (step + 1 < num_steps) {
      load_query_block<kDQK, kDV, k4Threads, Storage>(p, sQ, sDO, s_lse, s_delta,
                                                      plan.head(step + 1), plan.m0(step + 1), s_q,
                                                      q_begin, opaque(tid));
    }
    cp_async_commit();

    // In passes of kDQPassTiles n8 tiles (fewer live accumulators).
#pragma unroll 1
    for (int col = dq_col0; col < dq_col0 + Cfg::kDQCols; col += kDQPassTiles * 8) {
      float dq[2][kDQPassTiles][4];
      zero_acc(dq[0]);
      zero_acc(dq[1]);
      warp_gemm_dq<Elem, kDQPassTiles, kDQK>(dq, sDS, sDSLo, q_row0, sK, col, lane_s);
#pragma unroll
      for (int sl = 0; sl < 2; ++sl) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int qr = m0 + q_row0 + sl * 16 + g + half * 8;
          if (qr < s_q) {
            float* dst = dq_accum + (static_cast<int64_t>(q_begin + qr) * p.h_q + h) * kDQK +
                         col + t4 * 2;
#pragma unroll
            for (int j = 0; j < kDQPassTiles; ++j) {
              red_add_f32x2(dst + j * 8, dq[sl][j][2 * half], dq[sl][j][2 * half + 1]);
            }
          }
        }
      }
    }
  }

  write_dk_dv<Elem, kDQK, kDV, k4Threads>(p, smem + Cfg::kOffK, smem + Cfg::kOffV, acc_dk, acc_dv,
                                          key_row0, 0, 0, KeyBlock::again<Mask>(p), tid, lane);
}

}  // namespace flash_mla::portable::dense_bwd
