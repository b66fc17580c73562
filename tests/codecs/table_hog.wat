;; A codec that hoards host memory through a table instead of its linear memory:
;; wirepool_open grows its funcref table by 8 Mi elements (64 MiB of host memory,
;; eight bytes an element), past any sensible codec limit.
;;
;; Otherwise a minimal ABI v1 codec that emits nothing and returns 0 everywhere.
(module
  (memory (export "memory") 1)
  (table $table 1 funcref)

  (func (export "wirepool_abi_version") (result i32)
    (i32.const 1))

  ;; The input buffer is at 256 and may hold up to 32 KiB.
  (func (export "wirepool_buffer") (param $size i32) (result i32)
    (if (i32.gt_u (local.get $size) (i32.const 0x8000))
      (then (return (i32.const 0))))
    (i32.const 0x100))

  (func (export "wirepool_init") (param $config_len i32) (param $token_len i32) (result i32)
    (i32.const 0))

  ;; The misbehaviour under test.
  (func (export "wirepool_open") (result i32)
    (drop (table.grow $table (ref.null func) (i32.const 0x800000)))
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
