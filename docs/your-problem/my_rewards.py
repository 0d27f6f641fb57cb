"""The capitals example's reward: the right city, said briefly."""


def capital(completion: str, answer: str) -> dict:
    text = completion.strip().lower()
    right = answer.lower() in text
    brief = 1.0 if len(text.split()) <= 5 else 0.0
    # the reward the learner sees, and two components reported beside it
    return {"reward": float(right) + 0.2 * brief, "correct": right, "brief": brief}
