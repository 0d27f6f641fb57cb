"""The capitals example's reward: the right city, said briefly."""


def capital(completion: str, answer: str) -> dict:
    said = completion.strip().rstrip(".!").lower()
    right = said == answer.lower() or said.endswith(" is " + answer.lower())
    brief = 1.0 if len(said.split()) <= 5 else 0.0
    # the reward the learner sees, and two components reported beside it
    return {"reward": float(right) + 0.1 * brief, "correct": right, "brief": brief}
