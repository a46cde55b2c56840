"""The tools around the dpo_fast library, kept out of it: the benchmark harness (`bench/`, behind
`dpo-fast bench` and the scripts in benchmarks/), the DPO paper's reproduction (`reproduce/`), the
end-to-end demo with its embedded data set, and the tiny local models the demo, the reproduction and
the tests build. They import the library; the library never imports them (the `dpo-fast` command
names their modules and loads them only when one of their subcommands runs)."""
