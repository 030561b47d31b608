;; run() never returns and never calls the host: only the time budget (epoch deadline) stops it.
(component
  (core module $M
    (memory (export "memory") 1)
    (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))
  (core instance $m (instantiate $M))
  (func (export "run") (result (result (error string)))
    (canon lift (core func $m "run") (memory (core memory $m "memory"))))
)
