"""Block manager: no block leaked or freed twice across random allocate/append/free/evict sequences,
reference counts equal to the block tables that hold them, prefix hits only on equal tokens, LRU eviction."""

from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.infer.block_manager import BlockManager, chain_hash
from r1kit.infer.sampling import SamplingParams
from r1kit.infer.sequence import Sequence

PARAMS = SamplingParams()


def seq(tokens, window=4):
    return Sequence("r", 0, list(tokens), PARAMS, window)


def compute(bm, s):
    """What the engine does after a forward over all of a sequence's tokens."""
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)


def check(bm, live):
    bm.check_invariants()
    refs = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            if b >= 0:
                refs[b] += 1
        assert len(s.block_table) == bm.blocks_for(s.num_tokens)
    assert refs == [b.ref_count for b in bm.blocks]
    assert bm.num_free_blocks == sum(r == 0 for r in refs)


ops = st.lists(
    st.tuples(st.sampled_from(["new", "append", "free", "slide"]), st.integers(0, 10**6), st.lists(st.integers(0, 2), min_size=1, max_size=11)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(3, 12), st.integers(1, 4))
def test_random_operations_keep_the_books(operations, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    live: list[Sequence] = []
    for op, pick, tokens in operations:
        if op == "new":
            s = seq(tokens)  # tokens from {0, 1, 2}: prefixes are shared often
            if bm.can_allocate(s):
                bm.allocate(s)
                assert s.num_computed_tokens < s.num_tokens and s.num_computed_tokens % block_size == 0
                # hit blocks hold exactly these tokens
                for k in range(s.num_computed_tokens // block_size):
                    assert bm.blocks[s.block_table[k]].token_ids == tuple(s.token_ids[k * block_size : (k + 1) * block_size])
                compute(bm, s)
                live.append(s)
        elif op == "append" and live:
            s = live[pick % len(live)]
            s.token_ids.append(tokens[0])
            if bm.can_append(s):
                bm.may_append(s)
                compute(bm, s)
            else:
                bm.deallocate(s)  # what preemption does
                live.remove(s)
        elif op == "slide" and live:  # an all-local model drops blocks its window has left
            s = live[pick % len(live)]
            bm.free_before(s, s.num_computed_tokens - tokens[0] * block_size)
        elif op == "free" and live:
            bm.deallocate(live.pop(pick % len(live)))
        check(bm, live)
    for s in live:
        bm.deallocate(s)
    check(bm, [])
    assert bm.num_free_blocks == num_blocks


def test_prefix_hit_shares_blocks_and_reports_cached_tokens():
    bm = BlockManager(10, 2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute(bm, a)
    b = seq([1, 2, 3, 4, 9, 9])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 4
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    other_window = seq([1, 2, 3, 4, 5], window=8)  # K/V depend on the window: no hit
    bm.allocate(other_window)
    assert other_window.num_cached_tokens == 0
    whole = seq([1, 2, 3, 4])  # a fully cached prompt still leaves its last token to compute
    bm.allocate(whole)
    assert whole.num_cached_tokens == 2


def test_hash_collision_is_caught_by_comparing_tokens():
    bm = BlockManager(6, 2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute(bm, a)
    # pretend another prefix hashes like a's first block: the token comparison refuses it
    bm.blocks[a.block_table[0]].token_ids = (7, 7)
    b = seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_freed_blocks_stay_cached_until_needed_then_evicted_least_recently_used_first():
    bm = BlockManager(7, 2)
    a, b = seq([1, 1, 1, 1, 0]), seq([2, 2, 2, 2, 0])
    for s in (a, b):
        bm.allocate(s)
        compute(bm, s)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.deallocate(a)  # a first: a is the least recently used
    bm.deallocate(b)
    assert bm.num_free_blocks == 7 and len(bm.hash_to_block) == 4  # the two full blocks of each
    c = seq([3, 3, 3])  # 2 blocks: the never-used one and a's partial tail, evicting nothing
    bm.allocate(c)
    assert bm.num_evictions == 0 and c.block_table == [6, a_blocks[2]]
    d = seq([4, 4, 4])  # b's partial tail, then the least recently used cached block: a's tail first
    bm.allocate(d)
    assert d.block_table == [b_blocks[2], a_blocks[1]] and bm.num_evictions == 1
    again_b = seq([2, 2, 2, 2, 0])  # b's prefix survived; a's head is evicted for its third block
    bm.allocate(again_b)
    assert again_b.num_cached_tokens == 4 and again_b.block_table == [*b_blocks[:2], a_blocks[0]]
    assert bm.num_evictions == 2 and not bm.can_allocate(seq([1, 1, 1, 1, 0]))
    bm.check_invariants()


def test_chain_hash_depends_on_the_prefix():
    assert chain_hash([1, 2], 0) != chain_hash([1, 2], 1)
    assert chain_hash((1, 2), 5) == chain_hash([1, 2], 5)
