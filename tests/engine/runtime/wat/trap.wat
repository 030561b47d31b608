;; run() executes `unreachable`: the instance traps.
(component
  (core module $M
    (memory (export "memory") 1)
    (func (export "run") (result i32) unreachable))
  (core instance $m (instantiate $M))
  (func (export "run") (result (result (error string)))
    (canon lift (core func $m "run") (memory (core memory $m "memory"))))
)
