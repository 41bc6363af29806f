"""mark_unreachable_sites: a targeted site none of whose nodes is an ancestor of the loss outputs becomes
``skipped`` with ``SkipCause.UNREACHABLE``; every site left targeted reaches the loss."""

from graphlora.labels import SkipCause, get_decision, graph_meta, labelled_nodes
from graphlora.passes.mark_unreachable_sites_pass import live_nodes
from toy import BLOCK_ROLES, run_analysis, run_before

MARK = ["mark_unreachable_sites"]


def _decisions(toy):
    return {labels.module: get_decision(node) for node, labels in labelled_nodes(toy.gm.graph)}


def test_the_block_behind_an_unused_output_is_skipped(make_toy):
    """The projector reads the first vision block; the last one feeds only ``vision_hidden_states``."""
    toy = make_toy(feature_layer=-2)
    assert graph_meta(toy.gm).loss_outputs == [0] and graph_meta(toy.gm).loss_output_names == "`loss`"
    run_before(toy, "mark_unreachable_sites")
    chosen = _decisions(toy)
    [record] = run_analysis(toy, MARK)
    assert record.modified

    last = f"vision_tower.layers.{toy.cfg.vision_layers - 1}."
    after = _decisions(toy)
    skipped = {site for site, d in after.items() if d.skipped}
    assert skipped == {site for site in after if site.startswith(last)}
    for site in skipped:
        d, was = after[site], chosen[site]
        assert not d.targeted and d.cause == SkipCause.UNREACHABLE
        assert d.reason == f"its output never reaches `loss`, so it can receive no gradient (chosen by: {was.reason})"
        assert (d.r, d.alpha, d.dropout) == (was.r, was.alpha, was.dropout)
    assert {site: d for site, d in after.items() if site not in skipped} == \
        {site: d for site, d in chosen.items() if site not in skipped}


def test_every_site_left_targeted_reaches_the_loss(make_toy):
    toy = make_toy(feature_layer=-2)
    run_before(toy, "mark_unreachable_sites")
    run_analysis(toy, MARK)
    live = live_nodes(toy.gm)
    for node, labels in labelled_nodes(toy.gm.graph):
        if get_decision(node).targeted:
            assert node in live, labels.module


def test_without_a_loss_the_logits_are_the_signal(make_toy):
    toy = make_toy(feature_layer=-2, with_loss=False)
    assert graph_meta(toy.gm).loss_outputs == [0] and graph_meta(toy.gm).loss_output_names == "`logits`"
    run_before(toy, "mark_unreachable_sites")
    run_analysis(toy, MARK)
    skipped = [site for site, d in _decisions(toy).items() if d.skipped]
    assert len(skipped) == len(BLOCK_ROLES) and all("never reaches `logits`" in _decisions(toy)[s].reason for s in skipped)


def test_nothing_to_mark_when_everything_reaches_the_loss(toy):
    run_before(toy, "mark_unreachable_sites")
    before = _decisions(toy)
    [record] = run_analysis(toy, MARK)
    assert not record.modified
    assert _decisions(toy) == before
    assert not any(d.skipped for d in before.values())


def test_untargeted_sites_are_not_marked(make_toy):
    """Skipping is for sites the policy chose: with the vision tower off, its dead block keeps its flag decision."""
    toy = make_toy(feature_layer=-2)
    policy = {"finetune_vision_layers": False}
    run_before(toy, "mark_unreachable_sites", policy)
    [record] = run_analysis(toy, MARK, policy)
    assert not record.modified
    assert not any(d.skipped for d in _decisions(toy).values())
