"""Lifelong users, incrementally (after LIBER, arXiv 2411.14713).

- `log`: the append-only event log of a dataset; a refresh appends exactly what is new;
- `partitions` (UBSP): each user's stream cut into short partitions by a closing rule,
  maintained incrementally (only users with new events are touched);
- `summaries` (UIL): one interest summary per closed partition, cascaded from the previous
  one, by a language model or a deterministic template, cached by content hash;
- `pipeline`: the stages the CLI and the flows call (sync_log, partitions, summarise, profile).

The rest of userlens reaches this package only through `pipeline`.
"""
