// Portable dense MHA prefill backward, 128-key CTA (Config128 in config.h). Included
// by kernel.cuh after the helpers it shares with the other two CTAs (warp_gemm_slabs,
// softmax_p, ds_from_p, store_acc_to_smem, the loads, KeyBlock, StepPlan and the
// epilogue); same instructions, same steps (one 64-row query block of one query head
// of the GQA group), same numerics (P and dS rounded once) and bounds handling. The
// grid's x runs over 128-key blocks.
//
// Why: the other CTAs give each warp 16 keys, so in S^T = K Q^T and dP^T = V dO^T
// every Q / dO fragment feeds one m16 slab (3 ldmatrix.x4 per 4 MMAs), and each
// 64-key CTA loads every Q / dO block and adds its dQ with its own reductions. Here,
// as in FA2's backward, 8 warps share 128 keys:
//   S^T, dP^T   warp (kr = w % 4, kc = w / 4): keys 32 kr .. +32 (two slabs) x
//               queries 32 kc .. +32; every fragment feeds two MMAs (2 loads per 4)
//   P^T, dS^T   rounded once, to shared memory [128][64]
//   dV += P^T dO, dK += dS^T Q   keys 32 kr .. +32 x head dims kc d / 2 .. +d / 2
//               (1.5 loads per 4 MMAs)
//   dq_accum += dS K   queries 32 (w % 2) .. +32 x head dims (w / 2) d / 4 .. +d / 4
// and the Q / dO loads and dQ reductions per key are halved. The price: 164864 B of
// shared memory at d = 128 (one CTA of 8 warps per H100 SM; 99328 B at d = 64), so
// sm_120 (and sm_86/89) cannot run it at d = 128.
//
// Shared memory: Config128 (K, V resident; P^T, dS^T; two stages of Q, dO, lse,
// delta). Step i reads stage i % 2.
//
// Barrier protocol per step:
//   B1  wait for this step's cp.async group, __syncthreads: its Q, dO, lse, delta
//       visible; every warp has finished the previous step (its dV, dK and dQ), so
//       P^T, dS^T and the other stage may be overwritten.
//       S^T -> P^T (registers, then shared memory); dP^T -> dS^T likewise.
//   B2  __syncthreads: P^T and dS^T visible -> issue the next step's loads into the
//       other stage; they overlap the rest of the step.
//       dV += P^T dO, dK += dS^T Q, then dq_accum += dS K (reads dS^T and K) and its
//       REDs. The next B1 orders all of these before P^T / dS^T are rewritten.
// Issuing the loads right after B1 instead (overlapping the whole step) measured about
// 5% slower on the H100, and a single stage (a third barrier after dK, then the
// loads, overlapping only dQ) about 2.5% slower (docs/mha_bwd.md).
// Epilogue: as the other CTAs (dK / dV staged in the K / V tiles, 16-byte stores).
#pragma once

namespace flash_mla::portable::dense_bwd {

template <typename Elem, int kDQK, int kDV, typename Mask>
__global__ void __launch_bounds__(k128Threads, 1)
    dense_bwd_main128_kernel(const DensePrefillBwdParams p) {
  using Cfg = Config128<kDQK, kDV>;
#if defined(__CUDA_ARCH__) && \
    (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890 || __CUDA_ARCH__ >= 1200)
  // sm_86, sm_89, sm_120 / sm_121: 99 KB per block. Where this CTA needs more (d = 128)
  // it is never launched there (choose_layout and the entry's override check read the
  // device's opt-in limit); a launch would be a bug: trap, and the code below is not
  // emitted.
  if constexpr (Cfg::kSmemBytes > kMaxSmemPerBlockSm120) {
    __trap();
    return;
  }
#endif
  using Storage = typename Elem::Storage;
  extern __shared__ __align__(128) uint8_t smem[];

  const KeyBlock kb = KeyBlock::make<Mask, kBlockN128>(p);
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
  const uint32_t sP = cvta_shared(smem + Cfg::kOffP);
  const uint32_t sDS = cvta_shared(smem + Cfg::kOffDS);
  float* dq_accum = reinterpret_cast<float*>(static_cast<char*>(p.workspace) +
                                             dq_accum_offset(p.total_q, p.h_q));

  load_key_block<kDQK, kDV, k128Threads, Storage, kBlockN128>(p, sK, sV, kb, kv_head, tid);

  const StepPlan plan = StepPlan::make<Mask>(p, kb, kv_head);
  const int num_steps = plan.count;

  const int key_row0 = (warp & 3) * 32;  // S^T, dP^T, dV, dK rows (two slabs)
  const int kc = warp >> 2;
  const int s_col0 = kc * Cfg::kSCols;   // S^T / dP^T queries
  const int q_row0 = (warp & 1) * 32;    // dQ rows (two slabs)
  const int dq_col0 = (warp >> 1) * Cfg::kDQCols;

  constexpr int kSTiles = Cfg::kSCols / 8;
  constexpr int kDVTiles = Cfg::kDVCols / 8;
  constexpr int kDKTiles = Cfg::kDKCols / 8;
  constexpr int kDQTiles = Cfg::kDQCols / 8;
  float acc_dk[2][kDKTiles][4];
  float acc_dv[2][kDVTiles][4];
#pragma unroll
  for (int sl = 0; sl < 2; ++sl) {
    zero_acc(acc_dk[sl]);
    zero_acc(acc_dv[sl]);
  }

  // Step `step`'s stage (Q, dO, lse, delta).
  auto stage_of = [&](int step) { return smem + Cfg::kOffStage + (step & 1) * Cfg::kStageBytes; };
  auto load_step = [&](int step, int thread) {
    uint8_t* stage = stage_of(step);
    load_query_block<kDQK, kDV, k128Threads, Storage>(
        p, cvta_shared(stage + Cfg::kOffQ), cvta_shared(stage + Cfg::kOffDO),
        reinterpret_cast<float*>(stage + Cfg::kOffLse),
        reinterpret_cast<float*>(stage + Cfg::kOffDelta), plan.head(step), plan.m0(step), s_q,
        q_begin, thread);
  };
  if (num_steps > 0) load_step(0, tid);
  cp_async_commit();  // K, V and step 0 in one group

  for (int step = 0; step < num_steps; ++step) {
    const int h = plan.head(step);
    const int m0 = plan.m0(step);
    const int lane_s = opaque(lane);
    uint8_t* stage = stage_of(step);
    const uint32_t sQ = cvta_shared(stage + Cfg::kOffQ);
    const uint32_t sDO = cvta_shared(stage + Cfg::kOffDO);
    const float* s_lse = reinterpret_cast<const float*>(stage + Cfg::kOffLse);
    const float* s_delta = reinterpret_cast<const float*>(stage + Cfg::kOffDelta);

    cp_async_wait<0>();
    __syncthreads();  // B1

    float s[2][kSTiles][4];
    zero_acc(s[0]);
    zero_acc(s[1]);
    warp_gemm_slabs<Elem, kDQK, kSTiles, kDQK, kDQK, false, false, 2>(s, sK, key_row0, sQ,
                                                                       s_col0, lane_s);
    // Opaque copies: the mask's loop-invariant sums (n0 + 128 and the like) are
    // recomputed per step instead of held in registers through the loop (spills).
    const int n0_s = opaque(n0), s_q_s = opaque(s_q), s_k_s = opaque(s_k);
    // Most steps need no mask; they skip the per-element test (CTA-uniform branch).
    if (Mask::template needs_mask<kBlockN128>(m0, n0_s, s_q_s, s_k_s)) {
#pragma unroll
      for (int sl = 0; sl < 2; ++sl) {
        softmax_p<Mask, kSTiles, kBlockN128>(s[sl], key_row0 + 16 * sl, s_col0, m0, n0_s, s_q_s,
                                             s_k_s, s_lse, p.softmax_scale_log2, lane);
      }
    } else {
#pragma unroll
      for (int sl = 0; sl < 2; ++sl) {
        softmax_p<Mask, kSTiles, kBlockN128, false>(s[sl], key_row0 + 16 * sl, s_col0, m0, n0_s,
                                                    s_q_s, s_k_s, s_lse, p.softmax_scale_log2,
                                                    lane);
      }
    }
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
      store_acc_to_smem<Elem, kSTiles, kBlockM>(smem + Cfg::kOffP, s[sl], key_row0 + 16 * sl,
                                                s_col0, 1.f, lane_s);
    }
    float dp[2][kSTiles][4];
    zero_acc(dp[0]);
    zero_acc(dp[1]);
    warp_gemm_slabs<Elem, kDV, kSTiles, kDV, kDV, false, false, 2>(dp, sV, key_row0, sDO, s_col0,
                                                                   opaque(lane));
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
      ds_from_p<kSTiles>(s[sl], dp[sl], s_col0, s_delta, lane);
      store_acc_to_smem<Elem, kSTiles, kBlockM>(smem + Cfg::kOffDS, dp[sl], key_row0 + 16 * sl,
                                                s_col0, 1.f, lane_s);
    }
    __syncthreads();  // B2
    // The other stage was last read in step - 1, which every warp finished before B1.
    if (step + 1 < num_steps) load_step(step + 1, opaque(tid));
    cp_async_commit();

    // dV += P^T dO and dK += dS^T Q (contraction over the kBlockM queries).
    warp_gemm_slabs<Elem, kBlockM, kDVTiles, kBlockM, kDV, false, true, 2>(
        acc_dv, sP, key_row0, sDO, kc * Cfg::kDVCols, opaque(lane));
    warp_gemm_slabs<Elem, kBlockM, kDKTiles, kBlockM, kDQK, false, true, 2>(
        acc_dk, sDS, key_row0, sQ, kc * Cfg::kDKCols, opaque(lane));

    // dq_accum += dS K (contraction over the 128 keys): A = dS read transposed from
    // dS^T, B = K read transposed.
    float dq[2][kDQTiles][4];
    zero_acc(dq[0]);
    zero_acc(dq[1]);
    warp_gemm_slabs<Elem, kBlockN128, kDQTiles, kBlockM, kDQK, true, true, 2>(
        dq, sDS, q_row0, sK, dq_col0, lane_s);
#pragma unroll
    for (int sl = 0; sl < 2; ++sl) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int qr = m0 + q_row0 + sl * 16 + g + half * 8;
        if (qr < s_q) {
          float* dst = dq_accum + (static_cast<int64_t>(q_begin + qr) * p.h_q + h) * kDQK +
                       dq_col0 + t4 * 2;
#pragma unroll
          for (int j = 0; j < kDQTiles; ++j) {
            red_add_f32x2(dst + j * 8, dq[sl][j][2 * half], dq[sl][j][2 * half + 1]);
          }
        }
      }
    }
  }

  // opaque(tid): the epilogue's store addresses must not be shared with the K / V
  // loads' (the same rows and chunks), which kept them live through the loop (spills).
  write_dk_dv_slabs<Elem, kDQK, kDV, k128Threads, kBlockN128, 2>(
      p, smem + Cfg::kOffK, smem + Cfg::kOffV, acc_dk, acc_dv, key_row0, kc * Cfg::kDKCols,
      kc * Cfg::kDVCols, KeyBlock::again<Mask, kBlockN128>(p), opaque(tid), lane);
}

}  // namespace flash_mla::portable::dense_bwd
