"""A row reduction split over a 2-CTA thread-block cluster (CUDA sm_90+).

At N = 16384 one thread block per row processes a row at a time and leaves the 16-bit backward at
0.54 of copy bandwidth; split over the two blocks of a cluster, each block takes half of every
row's columns (its cached half rows, dx, and dgamma/dbeta partials), and the row's sums meet
through distributed shared memory (DSMEM). The schedule expresses the split with `rfactor`: each
block reduces its half into its own slot of a `[2, rows]` buffer, and the block that would add the
two slots together (a reduction over the cluster rank) is rewritten here, after scheduling, into
an exchange. Both blocks then hold own + partner, which IEEE addition makes the same bits in
either order, so the result is deterministic.

TIR's dataflow cannot say "the partner block's value", so the exchange is a pair of opaque calls
(`with_cluster_exchange`), and the kernel is marked `__cluster_dims__(2, 1, 1)` in its CUDA source
(`add_cluster_dims`, a CUDA codegen post-processor): TVM's runtime launches the blockIdx extents
as the grid, so the rank is blockIdx.x (0 or 1) and the two blocks of a cluster are the two halves
of the same rows. A second post-processor (`exchange_warp_partials`) then trades, in kernels of
the counted exchange, TVM's block allreduce and the exchange of block sums for an exchange of warp
sums: one mbarrier wait a row and no block barrier.
"""

from __future__ import annotations

import re

from tvm import s_tir, tirx
from tvm.backend.cuda.op import cuda_func_call
from tvm.ir import Range
from tvm.sym import Analyzer
from tvm.tirx.analysis import undefined_vars

from schedules import cuda_source, tir_tree

SIZE = 2  # blocks per cluster (the rank loop's extent)
RANK_AXIS = "blockIdx.x"
CHUNK_AXIS = "blockIdx.y"  # the chunk of rows a cluster walks
# Marks the block that adds the ranks' slots: the rewrite below replaces it, and nothing else.
EXCHANGE_KEY = "lntune.cluster_exchange"
# Blocks that need neither c1 nor c2 (the dgamma/dbeta partial updates): the rewrite moves them
# between a row's publish and collect, so the wait for the partner overlaps them.
INDEPENDENT = ("dgamma_part_update", "dbeta_part_update")

# Both protocols push, not pull: thread 0 of each block sends its two sums into the partner's
# slot (rel % 2, `rel` the row's position in the block's chunk) and the partner's threads wait in
# their own shared memory, so a block waits for its partner's sums only, not for all of its
# threads as a cluster barrier a row did (docs/performance.md, section 7). A slot is rewritten
# two rows on, only after the writer collected the row between, which the reader sent after its
# allreduce barrier, so after all its threads read the slot. Both start and end every block with
# a cluster barrier (nothing is sent before the partner initialised its slots, and no block
# exits while its partner may still send into it). Every thread of both blocks calls collect for
# the same rows (the rows of a cluster are the same, and the row predicate is uniform).
_BARRIER = """
#ifndef LNTUNE_CLUSTER_BARRIER
#define LNTUNE_CLUSTER_BARRIER
__device__ __forceinline__ void lntune_cluster_barrier() {
  asm volatile("barrier.cluster.arrive.release.aligned;\\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\\n" ::: "memory");
}
#endif
"""
# "counted": st.async stores the sums into the partner's slot and counts their 8 bytes down on
# the partner's mbarrier for that slot; the partner waits for the barrier's phase (rel / 2) % 2.
# Each row thread 0 also arrives on its own barrier expecting the 8 bytes (one arrival a phase;
# the bytes may land first, the count going negative meanwhile). No thread still waits on a phase
# when its barrier completes the next phase, for the reason a slot is not overwritten early.
# No fence: on the H100 it took the 16-bit N = 16384 backward from 219.8 to 190.0 us (bfloat16),
# as fast as no exchange at all (docs/performance.md, section 7).
_COUNTED = (
    """
__device__ __forceinline__ float2* lntune_cluster_counted_slots() {
  __shared__ float2 slots[2];  // shared variables of a function are static: one pair a block
  return slots;
}
__device__ __forceinline__ unsigned lntune_cluster_counted_bar(int rel) {
  __shared__ unsigned long long bars[2];
  return (unsigned)__cvta_generic_to_shared(&bars[rel & 1]);
}
"""
    + _BARRIER
    + """
__device__ __forceinline__ void lntune_cluster_start_counted() {
  if (threadIdx.x < 2) {
    unsigned bar = lntune_cluster_counted_bar(threadIdx.x);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\\n" :: "r"(bar) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;\\n" ::: "memory");
  lntune_cluster_barrier();
}
__device__ __forceinline__ int lntune_cluster_publish_counted(float a, float b, int rel) {
  if (threadIdx.x == 0) {
    unsigned rank, slot, bar = lntune_cluster_counted_bar(rel);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 8;\\n" :: "r"(bar) : "memory");
    asm volatile("mov.u32 %0, %%cluster_ctarank;\\n" : "=r"(rank));
    slot = (unsigned)__cvta_generic_to_shared(&lntune_cluster_counted_slots()[rel & 1]);
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;\\n" : "+r"(slot) : "r"(rank ^ 1u));
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;\\n" : "+r"(bar) : "r"(rank ^ 1u));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];\\n"
                 :: "r"(slot), "f"(a), "f"(b), "r"(bar) : "memory");
  }
  return 0;
}
__device__ __forceinline__ float2 lntune_cluster_collect_counted(float a, float b, int rel) {
  unsigned done, bar = lntune_cluster_counted_bar(rel), phase = ((unsigned)rel >> 1) & 1u;
  do {
    asm volatile("{\\n .reg .pred p;\\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\\n"
                 " selp.u32 %0, 1, 0, p;\\n}\\n" : "=r"(done) : "r"(bar), "r"(phase) : "memory");
  } while (!done);
  float2 partner = lntune_cluster_counted_slots()[rel & 1];
  return make_float2(a + partner.x, b + partner.y);
}
__device__ __forceinline__ void lntune_cluster_finish_counted() { lntune_cluster_barrier(); }
"""
)
# "tagged": st.shared::cluster stores the sums, then the row's tag (rel; slots start at -1) with
# st.release.cluster; the partner's threads spin on the tag (ld.acquire). The release orders every
# earlier memory access of thread 0, its dx stores among them: 30 us of the bfloat16 kernel
# above. It stays for row caches laid out interleaved (chunked = 0): TVM sizes those by the row's
# span and they are registers only once ptxas promotes them, which it does not in a kernel with
# st.async (float32 N = 16384's choice: a 48 KB stack frame, 303 -> 435 us).
_TAGGED = (
    """
__device__ __forceinline__ float4* lntune_cluster_tagged_slots() {
  __shared__ float4 slots[2];  // (a, b, tag, -)
  return slots;
}
"""
    + _BARRIER
    + """
__device__ __forceinline__ void lntune_cluster_start_tagged() {
  if (threadIdx.x < 2) lntune_cluster_tagged_slots()[threadIdx.x].z = __int_as_float(-1);
  lntune_cluster_barrier();
}
__device__ __forceinline__ int lntune_cluster_publish_tagged(float a, float b, int rel) {
  if (threadIdx.x == 0) {
    unsigned rank, slot = (unsigned)__cvta_generic_to_shared(&lntune_cluster_tagged_slots()[rel & 1]);
    asm volatile("mov.u32 %0, %%cluster_ctarank;\\n" : "=r"(rank));
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;\\n" : "+r"(slot) : "r"(rank ^ 1u));
    asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};\\n" :: "r"(slot), "f"(a), "f"(b) : "memory");
    asm volatile("st.release.cluster.shared::cluster.b32 [%0], %1;\\n" :: "r"(slot + 8u), "r"(rel) : "memory");
  }
  return 0;
}
__device__ __forceinline__ float2 lntune_cluster_collect_tagged(float a, float b, int rel) {
  unsigned slot = (unsigned)__cvta_generic_to_shared(&lntune_cluster_tagged_slots()[rel & 1]);
  int seen;
  do {
    asm volatile("ld.acquire.cluster.shared::cta.b32 %0, [%1];\\n" : "=r"(seen) : "r"(slot + 8u) : "memory");
  } while (seen != rel);
  float ra, rb;
  asm volatile("ld.shared::cta.v2.f32 {%0, %1}, [%2];\\n" : "=f"(ra), "=f"(rb) : "r"(slot) : "memory");
  return make_float2(a + ra, b + rb);
}
__device__ __forceinline__ void lntune_cluster_finish_tagged() { lntune_cluster_barrier(); }
"""
)
PROTOCOLS = {"counted": _COUNTED, "tagged": _TAGGED}
# "warps", a CUDA-source upgrade of "counted" (exchange_warp_partials), on its barriers, start and
# finish (the counted helpers are in every source it rewrites): lane 0 of every warp sends
# its warp's partial sums with st.async into one slot of both blocks ([row parity][writer's
# rank][warp]), counted on each block's mbarrier for the row parity (2 ranks x warps x 8 bytes);
# every thread waits for the phase, then each warp adds the 2 x 32 slots in one fixed order (rank
# 0 + rank 1 per lane, then a butterfly, which leaves every lane the same bits), so both blocks
# hold the same row sums. It replaces the block allreduce's barriers and the exchange of block
# sums. A slot (and its barrier phase) is rewritten two rows on, by a warp that waited for the
# row between, which every warp of both blocks sent after it had read the slot.
_WARPS = """
__device__ __forceinline__ float2* lntune_cluster_warps_slots() {
  __shared__ float2 slots[2 * 2 * 32];
  return slots;
}
__device__ __forceinline__ void lntune_cluster_publish_warps(float a, float b, int rel) {
  unsigned bar = lntune_cluster_counted_bar(rel);
  if (threadIdx.x == 0) {
    unsigned bytes = 2u * (blockDim.x / 32u) * 8u;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\\n" :: "r"(bar), "r"(bytes) : "memory");
  }
  if ((threadIdx.x & 31u) == 0) {
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\\n" : "=r"(rank));
    unsigned slot = (unsigned)__cvta_generic_to_shared(
        &lntune_cluster_warps_slots()[((rel & 1) * 2 + rank) * 32 + (threadIdx.x >> 5)]);
    #pragma unroll
    for (unsigned to = 0; to < 2; ++to) {
      unsigned to_slot, to_bar;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\\n" : "=r"(to_slot) : "r"(slot), "r"(to));
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\\n" : "=r"(to_bar) : "r"(bar), "r"(to));
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];\\n"
                   :: "r"(to_slot), "f"(a), "f"(b), "r"(to_bar) : "memory");
    }
  }
}
__device__ __forceinline__ float2 lntune_cluster_collect_warps(int rel) {
  unsigned done, bar = lntune_cluster_counted_bar(rel), phase = ((unsigned)rel >> 1) & 1u;
  do {
    asm volatile("{\\n .reg .pred p;\\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\\n"
                 " selp.u32 %0, 1, 0, p;\\n}\\n" : "=r"(done) : "r"(bar), "r"(phase) : "memory");
  } while (!done);
  unsigned lane = threadIdx.x & 31u;
  float2 r0 = make_float2(0.f, 0.f), r1 = r0;
  if (lane < blockDim.x / 32u) {
    r0 = lntune_cluster_warps_slots()[((rel & 1) * 2 + 0) * 32 + lane];
    r1 = lntune_cluster_warps_slots()[((rel & 1) * 2 + 1) * 32 + lane];
  }
  float a = r0.x + r1.x, b = r0.y + r1.y;
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  return make_float2(a, b);
}
"""


def protocol_for(knobs: dict) -> str:
    """The exchange a layout gets: "counted" (no fence), except for interleaved row caches."""
    return "counted" if knobs.get("chunked") else "tagged"


def helper(step: str, protocol: str) -> str:
    return f"lntune_cluster_{step}_{protocol}"


def helper_source(protocol: str) -> str:
    """All of a protocol's helpers, behind one include guard: every call carries the source, and
    a library whose kernels use both protocols gets each protocol's helpers once."""
    guard = f"LNTUNE_CLUSTER_{protocol.upper()}"
    return f"\n#ifndef {guard}\n#define {guard}\n{PROTOCOLS[protocol]}#endif\n"


def split_reduction(sch: s_tir.Schedule, block: str) -> s_tir.schedule.SBlockRV:
    """rfactor `block`'s reduction over the cluster rank: returns the per-rank block (`<block>_rf`,
    which reduces one half of the columns) and marks `block`, which now adds the ranks' slots."""
    loops = sch.get_loops(sch.get_sblock(block))
    rank, _ = sch.split(loops[-1], [SIZE, None])
    rf = sch.rfactor(rank, 0)
    sch.annotate(sch.get_sblock(block), EXCHANGE_KEY, 1)
    return rf


def _call(name: str, *args, source: str) -> tirx.Evaluate:
    return tirx.Evaluate(cuda_func_call(name, *args, source_code=source))


def _bound_var(func: tirx.PrimFunc, axis: str) -> tirx.Var:
    loops = tir_tree.find(
        func.body,
        lambda n: isinstance(n, tirx.For) and n.thread_binding is not None and n.thread_binding.thread_tag == axis,
    )
    if len(loops) != 1:
        raise ValueError(f"a cluster kernel needs exactly one loop bound to {axis}, found {len(loops)}")
    return loops[0].loop_var


def _position_in_chunk(row_value: tirx.PrimExpr, chunk: tirx.Var) -> tirx.PrimExpr:
    """A row's index within its block's chunk: the row binding with the chunk at 0 (rows split
    as [chunk, rank, step, granule], so chunk * rows + position)."""
    analyzer = Analyzer()
    analyzer.bind(chunk, tirx.const(0, chunk.ty))
    position = analyzer.simplify(row_value)
    # The start must not move with the loops that walk the chunk, or the blocks' slots and phases
    # would not follow the rows one by one.
    start = Analyzer().simplify(row_value - position)
    walking = undefined_vars(position)
    if any(v.same_as(w) for v in undefined_vars(start) for w in walking):
        raise ValueError(f"cluster exchange: row {row_value} is not a chunk's start plus a position")
    return position


def _exchange(
    realize: s_tir.SBlockRealize, rank: tirx.Var, chunk: tirx.Var, protocol: str
) -> tuple[s_tir.SBlockRealize, s_tir.SBlockRealize]:
    """The marked block, `out[i] += slot[r, i]` over r, as two: publish `slot[rank, i]` (block
    "c_publish"), and collect own + partner into `out[i]` (block "c"). Both also bind the row's
    position in its chunk, which names the slot and the barrier phase."""
    block = realize.block
    body = block.body.seq if isinstance(block.body, tirx.SeqStmt) else [block.body]
    stores = [s for s in body if isinstance(s, tirx.BufferStore)]
    spatial = [(iv, v) for iv, v in zip(block.iter_vars, realize.iter_values) if iv.iter_type == tirx.IterVar.DataPar]
    if len(spatial) != 1 or len(stores) != 2 or len(block.reads) != 2:
        raise ValueError(f"cluster exchange: unexpected block {block.name_hint}")
    ((row_iv, row_value),) = spatial
    row = row_iv.var
    values, reads = [], []
    for region, store in zip(block.reads, stores):
        slot = region.source
        if not slot.name.startswith(store.buffer.name.removesuffix("_local")):  # c_v0_rf_local -> c_v0_local
            raise ValueError(f"cluster exchange: {slot.name} does not feed {store.buffer.name}")
        values.append(tirx.BufferLoad(slot, [rank, row]))
        reads.append(tirx.BufferRegion(slot, [Range.from_min_extent(rank, 1), Range.from_min_extent(row, 1)]))
    position = tirx.Var("v_position", row_value.ty)
    position_iv = tirx.IterVar(row_iv.dom, position, tirx.IterVar.DataPar)
    iter_vars, iter_values = [row_iv, position_iv], [row_value, _position_in_chunk(row_value, chunk)]
    rel = tirx.Cast("int32", position)  # below the row count, so below 2**31 (M * N elements)
    # It writes a local token so that every thread calls the helper (TVM runs a block that writes
    # nothing on thread 0 only): the helper itself picks the thread that stores.
    token = tirx.decl_buffer((1,), "int32", "cluster_token", scope="local")
    source = helper_source(protocol)
    arrive = cuda_func_call(helper("publish", protocol), *values, rel, source_code=source, return_type="int32")
    publish = s_tir.SBlock(
        iter_vars,
        reads,
        [tirx.BufferRegion(token, [Range.from_min_extent(0, 1)])],
        f"{block.name_hint}_publish",
        tirx.BufferStore(token, arrive, [0]),
        alloc_buffers=[token],
    )
    # By value in, one float2 out into a scratch pair: handed pointers to the block's outputs, TVM
    # passed the allreduce's shared result (which it had merged them into) and every thread wrote it.
    scratch = tirx.decl_buffer((SIZE,), "float32", "cluster_pair", scope="local")
    pair = cuda_func_call(helper("collect", protocol), *values, rel, source_code=source, return_type="float32x2")
    body = [tirx.BufferStore(scratch, pair, [tirx.Ramp(0, 1, SIZE)])]
    body += [tirx.BufferStore(s.buffer, tirx.BufferLoad(scratch, [i]), s.indices) for i, s in enumerate(stores)]
    collect = s_tir.SBlock(
        iter_vars,
        reads,
        block.writes,
        block.name_hint,
        tirx.SeqStmt(body),
        alloc_buffers=[scratch],
        annotations=block.annotations,
    )
    return tuple(s_tir.SBlockRealize(iter_values, realize.predicate, b) for b in (publish, collect))


def _is_rank_sum(stmt: tirx.Stmt) -> bool:
    """The marked block sits alone in its loop over the rank slots."""
    return (
        isinstance(stmt, tirx.For)
        and isinstance(stmt.body, s_tir.SBlockRealize)
        and EXCHANGE_KEY in stmt.body.block.annotations
    )


def _names(stmt: tirx.Stmt) -> set[str]:
    return {n.block.name_hint for n in tir_tree.find(stmt, lambda n: isinstance(n, s_tir.SBlockRealize))}


def with_cluster_exchange(func: tirx.PrimFunc, protocol: str = "counted") -> tirx.PrimFunc:
    """Rewrite the marked rank-sum (split_reduction) into the DSMEM exchange of `protocol`, with
    the row's partial-sum updates between its publish and its collect, and start and end every
    block with a cluster barrier. A function without the mark is returned as it is."""
    if not tir_tree.find(func.body, _is_rank_sum):
        return func
    rank, chunk = _bound_var(func, RANK_AXIS), _bound_var(func, CHUNK_AXIS)

    def rewrite(node):
        if isinstance(node, tirx.SeqStmt) and any(_is_rank_sum(s) for s in node.seq):
            at = next(i for i, s in enumerate(node.seq) if _is_rank_sum(s))
            publish, collect = _exchange(node.seq[at].body, rank, chunk, protocol)
            moved, rest = [], []
            for stmt in (tir_tree.rewrite(s, rewrite) for s in node.seq[at + 1 :]):
                (moved if _names(stmt) & set(INDEPENDENT) else rest).append(stmt)
            earlier = [tir_tree.rewrite(s, rewrite) for s in node.seq[:at]]
            return tirx.SeqStmt([*earlier, publish, *moved, collect, *rest])
        if isinstance(node, tirx.For) and node.loop_var.same_as(rank):
            body = [
                _call(helper("start", protocol), source=helper_source(protocol)),
                tir_tree.rewrite(node.body, rewrite),
                _call(helper("finish", protocol), source=helper_source(protocol)),
            ]
            return tir_tree.loop_with(node, tirx.SeqStmt(body))
        return None

    return func.with_body(tir_tree.rewrite(func.body, rewrite))


_KERNEL = re.compile(r'(extern "C" __global__ void )((?:__launch_bounds__\([^)]*\) )?)(\w+)\(')


def add_cluster_dims(code: str) -> str:
    """Mark each kernel of a CUDA source that exchanges through the cluster (its declaration and
    definition) `__cluster_dims__(2, 1, 1)`; other kernels and sources are returned as they are."""
    starts = [(m.start(), m.group(3)) for m in _KERNEL.finditer(code)] + [(len(code), "")]
    collects = tuple(f"{helper('collect', protocol)}(" for protocol in PROTOCOLS)
    calling = {name for (at, name), (end, _) in zip(starts, starts[1:]) if any(c in code[at:end] for c in collects)}
    return _KERNEL.sub(
        lambda m: (
            f"{m.group(1)}{m.group(2)}__cluster_dims__({SIZE}, 1, 1) {m.group(3)}("
            if m.group(3) in calling
            else m.group(0)
        ),
        code,
    )


# TVM's lowering of a row's (c1, c2) allreduce over a block of several warps, from the staging
# stores of the warp sums to the second barrier, then the counted exchange's publish of the block
# sums; and the collect of those sums.
_ALLREDUCE_AND_PUBLISH = re.compile(
    r"(?P<indent>\n[ \t]+)if \(\(\(\(int64_t\)threadIdx\.x\) % \(int64_t\)32\) == \(int64_t\)0\) \{\n"
    r"[ \t]+red_buf_staging_ptr\w*\[[^\n]*\] = (?P<a>red_buf0_ptr\w*)\[0\];\n"
    r"[ \t]+red_buf_staging_ptr\w*\[[^\n]*\] = (?P<b>red_buf1_ptr\w*)\[0\];\n"
    r"[ \t]+\}\n[ \t]+__syncthreads\(\);\n"
    r"(?:(?![ \t]*__syncthreads)[^\n]*\n)*?"  # its second stage, which holds no barrier
    r"[ \t]+__syncthreads\(\);\n"
    r"(?P<between>(?:[ \t]+int(?:64_t)? \w+ = [^\n]*;\n)*)"
    r"[ \t]+if \((?P<predicate>[^\n]*)\) \{\n"
    r"[ \t]+cluster_token_ptr\w*\[0\] = lntune_cluster_publish_counted\(\(\(volatile float\*\)\w+\)\[0\], "
    r"\(\(volatile float\*\)\w+\)\[0\], (?P<rel>[^\n]*)\);\n"
    r"[ \t]+\}"
)
_COLLECT_BLOCK_SUMS = re.compile(
    r"lntune_cluster_collect_counted\(\(\(volatile float\*\)\w+\)\[0\], \(\(volatile float\*\)\w+\)\[0\], "
    r"(?P<rel>[^\n]*)\);"
)


def exchange_warp_partials(code: str) -> str:
    """The "warps" exchange (see _WARPS) in place of the counted exchange of block sums and the
    block allreduce before it, in a CUDA source where every publish and collect has TVM's
    allreduce in the expected form; any other source is returned as it is.

    The block allreduce cost two block barriers a row and the exchange waited for the partner's
    block sum on top; with warp sums sent straight to both blocks, one mbarrier wait a row covers
    both. H100, backward alone, the 16-bit N = 16384 kernels with two-row chunks: 157.6 -> 156.3 us
    (bfloat16), 157.6 -> 156.4 (float16); with today's single-row chunks 153.4 either way
    (bfloat16), 153.2 -> 152.8 (float16); outputs within 1.2e-5 of the counted exchange's, bitwise
    equal from run to run (docs/performance.md, section 7)."""
    publishes = code.count("lntune_cluster_publish_counted(((volatile")

    def exchange(m: re.Match) -> str:
        indent = m["indent"]
        call = f"{helper('publish', 'warps')}({m['a']}[0], {m['b']}[0], {m['rel']});"
        return f"{indent}{m['between'].strip()}{indent}if ({m['predicate']}) {{{indent}  {call}{indent}}}"

    rewritten, matched = _ALLREDUCE_AND_PUBLISH.subn(exchange, code)
    rewritten, collected = _COLLECT_BLOCK_SUMS.subn(lambda m: f"{helper('collect', 'warps')}({m['rel']});", rewritten)
    if not publishes or not matched == collected == publishes:
        return code
    first_kernel = rewritten.index('extern "C" __global__')  # after the counted helpers, which it uses
    helpers = f"\n#ifndef LNTUNE_CLUSTER_WARPS\n#define LNTUNE_CLUSTER_WARPS\n{_WARPS}#endif\n"
    return rewritten[:first_kernel] + helpers + rewritten[first_kernel:]


# Registered with lntune's CUDA rewrites (schedules.hooks runs them around lntune's builds only): a
# kernel whose TIR collects from the partner must be launched as a cluster, and one exchanging by the
# counted protocol gets the warps exchange; either missing in its source is an error, not a no-op.
cuda_source.add(add_cluster_dims, wanted_by=lambda tir: '"lntune_cluster_collect_' in tir)
cuda_source.add(exchange_warp_partials, wanted_by=lambda tir: '"lntune_cluster_publish_counted"' in tir)
