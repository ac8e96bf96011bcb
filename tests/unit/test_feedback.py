"""The explorer's message rules without a terminal (tui/controllers/feedback.py)."""

from __future__ import annotations

from modelscope_tui.tui.controllers.feedback import HELD_MAX, HISTORY_MAX, Feedback


def test_a_repeat_with_nothing_changed_is_counted_not_shown():
    fb = Feedback(clock=lambda: 0.0)
    assert fb.say("nothing placed yet", "warning", 5, state=1, dialog=False) is not None
    assert fb.say("nothing placed yet", "warning", 5, state=1, dialog=False) is None
    assert [(m.text, m.count) for m in fb.history] == [("nothing placed yet", 2)]
    # the state changed, or another message came between: news again
    assert fb.say("nothing placed yet", "warning", 5, state=2, dialog=False) is not None
    fb.say("froze 1 tensor(s)", "information", 3, state=2, dialog=False)
    assert fb.say("nothing placed yet", "warning", 5, state=2, dialog=False) is not None
    assert [m.count for m in fb.history] == [2, 1, 1, 1]
    # the same text at another severity is another message
    assert fb.say("nothing placed yet", "error", 5, state=2, dialog=False) is not None


def test_toasts_under_a_dialog_wait_and_only_a_few_come_back_at_once():
    fb = Feedback()
    for i in range(HELD_MAX + 3):
        assert fb.say(f"m{i}", "information", 3, state=0, dialog=True) is None
    assert len(fb.history) == HELD_MAX + 3  # every one listed at once
    back = fb.release()
    assert len(back) == HELD_MAX and "4 more message(s)" in back[0].text
    assert [t.text for t in back[1:]] == [f"m{i}" for i in range(4, HELD_MAX + 3)]
    assert fb.release() == []
    fb.say("one", "warning", 3, state=0, dialog=True)
    assert [t.text for t in fb.release()] == ["one"]


def test_history_keeps_the_newest():
    fb = Feedback()
    for i in range(HISTORY_MAX + 5):
        fb.say(str(i), "information", 1, state=i, dialog=False)
    assert len(fb.history) == HISTORY_MAX and fb.history[-1].text == str(HISTORY_MAX + 4)
