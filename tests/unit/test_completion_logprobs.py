"""The legacy /v1/completions logprobs shape (server/serving.completion_logprobs): top_logprobs
is keyed by text, and tokens that decode alike (byte pieces as U+FFFD) keep the best one's
logprob, so a greedy token's logprob is the largest of its position's entries."""
from servelm.outputs import Logprob
from servelm.server.serving import completion_logprobs


def test_tokens_decoding_alike_keep_the_best_logprob():
    pos = {7: Logprob(-0.5, 1, "\ufffd"), 9: Logprob(-0.9, 2, "O"), 11: Logprob(-1.7, 3, "\ufffd")}
    out = completion_logprobs([7], [pos], 3, 0, decode=lambda t: f"<{t}>")
    assert out["tokens"] == ["\ufffd"] and out["token_logprobs"] == [-0.5]
    assert out["top_logprobs"] == [{"\ufffd": -0.5, "O": -0.9}]
    # a sampled token outside the top n is added under its text
    pos2 = {3: Logprob(-4.0, 9, "x"), 9: Logprob(-0.9, 1, "O")}
    out = completion_logprobs([3], [pos2], 1, 0, decode=lambda t: f"<{t}>")
    assert out["top_logprobs"] == [{"O": -0.9, "x": -4.0}]
