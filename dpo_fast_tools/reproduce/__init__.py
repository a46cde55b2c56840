"""Reproductions of the DPO paper's experiments, small and on CPU (`dpo-fast reproduce ...`).

    task.py       the controlled-generation task: a synthetic review language and its exact reward
    sft.py        the SFT model (= the reference) by maximum likelihood; the shared optimisation loop
    sampling.py   seeded sampling, log-probs with the fused op, reward and KL(pi || pi_ref) estimates
    baselines.py  Preferred-FT and Unlikelihood training
    frontier.py   the reward-KL frontier grid (DPO through dpo_fast.train), CSV, PNG, JSON
    cli.py        the command line
"""
