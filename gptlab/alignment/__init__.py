"""The arithmetic that DPO, the reward model, PPO and GRPO share, each piece written once, on plain
tensors (torch only: no Lightning, nothing from ``tasks/``, ``data/`` or ``cli/``):

* :mod:`~gptlab.alignment.logprobs`: per-token log-probs of the chosen tokens (one formula);
* :mod:`~gptlab.alignment.reference`: the reference model (frozen copy / adapters off /
  precomputed) and its checkpoint state under one key;
* :mod:`~gptlab.alignment.losses`: DPO, Bradley-Terry, PPO's clipped policy and value losses;
* :mod:`~gptlab.alignment.grpo`: GRPO's group-relative advantages and its loss (GRPO, DAPO, Dr. GRPO,
  GSPO aggregation and ratios);
* :mod:`~gptlab.alignment.kl`, :mod:`~gptlab.alignment.advantages`, :mod:`~gptlab.alignment.masked`:
  KL estimates and the KL coefficient, per-token rewards and GAE, masked statistics and whitening;
* :mod:`~gptlab.alignment.rollout`: completions sampled through ``generate()`` (G per prompt),
  packed, with masks for padding and truncation, and their log-probs read back.
"""
