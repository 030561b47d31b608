;; run() grows its memory by 16 MiB at a time until the host refuses, then traps.
(component
  (core module $M
    (memory (export "memory") 1)
    (func (export "run") (result i32)
      (loop $l (br_if $l (i32.ne (memory.grow (i32.const 256)) (i32.const -1))))
      unreachable))
  (core instance $m (instantiate $M))
  (func (export "run") (result (result (error string)))
    (canon lift (core func $m "run") (memory (core memory $m "memory"))))
)
