"""Stop strings as match tables, built once per request's parameters (off the engine thread) and read by the
detokenizer, which keeps only how much of each stop string the text ends with."""
from array import array


class StopPattern:
    """One stop string and its Knuth-Morris-Pratt border table, so that how much of the end of a growing text is
    the start of the stop string is kept up to date in constant amortized time per character: checking every
    prefix of a long stop string against the text at each step cost time in the square of its length."""

    def __init__(self, stop: str):
        self.stop = stop
        # border[i]: the longest proper prefix of stop[:i + 1] that also ends it (4 bytes a character)
        self.border = border = array("I", bytes(4 * len(stop)))
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = border[k - 1]
            k += stop[i] == stop[k]
            border[i] = k

    def advance(self, matched: int, text: str) -> int:
        """How much of the stop string the text ends with after `text` is appended, given that it ended with
        `matched` characters of it before, short of a whole match (which the caller finds and cuts itself)."""
        stop, border, k = self.stop, self.border, matched
        for char in text:
            while k and stop[k] != char:
                k = border[k - 1]
            k += stop[k] == char
            if k == len(stop):  # a whole match: what may still grow is its border
                k = border[k - 1]
        return k
