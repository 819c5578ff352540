"""The P2P ring family (ring, zigzag, stripe; batch and packed documents): public functions
(:mod:`.api`), schedules (:mod:`.schedules`, :mod:`.packed`) and the engine (:mod:`.engine`)."""
