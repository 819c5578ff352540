"""The all-gather family (llama3, zigzag-llama3) for packed documents: public functions
(:mod:`.api`), the plan as data (:mod:`.plan`) and the strategies acting on it (:mod:`.gather`,
:mod:`.own_keys_first`)."""
