;; A codec whose start function never returns: it loops forever while the module is
;; instantiated, before the engine calls any export, so the per-call time budget must
;; already be in force during instantiation.
;;
;; Otherwise a minimal ABI v1 codec that emits nothing and returns 0 everywhere.
(module
  (memory (export "memory") 1)

  (func $spin
    (loop $forever (br $forever)))
  (start $spin)

  (func (export "wirepool_abi_version") (result i32)
    (i32.const 1))

  ;; The input buffer is at 256 and may hold up to 32 KiB.
  (func (export "wirepool_buffer") (param $size i32) (result i32)
    (if (i32.gt_u (local.get $size) (i32.const 0x8000))
      (then (return (i32.const 0))))
    (i32.const 0x100))

  (func (export "wirepool_init") (param $config_len i32) (param $token_len i32) (result i32)
    (i32.const 0))

  (func (export "wirepool_open") (result i32)
    (i32.const 0))

  (func (export "wirepool_decode") (param $count i32) (param $total_len i32) (result i32)
    (i32.const 0))

  (func (export "wirepool_encode") (param $op i32) (param $id i64) (param $channel_len i32)
                                   (param $payload_len i32) (result i32)
    (i32.const 0))

  (func (export "wirepool_tick") (param $now_ms i64) (result i32)
    (i32.const 0))

  ;; No output records, ever.
  (func (export "wirepool_output") (result i64)
    (i64.const 0)))
