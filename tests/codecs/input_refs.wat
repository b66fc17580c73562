;; A codec that needs the DATA_IN_INPUT extension and points every data record into
;; its input (docs/codec-abi.md, "Engine features" and "Output records"):
;;
;; - wirepool_engine_features: remembers its argument. wirepool_init fails (returns 7)
;;   unless it was called with bit 1 (DATA_IN_INPUT) set, so a connection becomes ready
;;   only if the engine said, before init, that it understands the extension.
;; - wirepool_open: READY.
;; - wirepool_decode: per frame, one DATA_IN_INPUT record on channel "t" pointing at the
;;   frame's body in the input buffer. After a frame whose body starts with 'X', a
;;   second DATA_IN_INPUT record that points one byte past the end of the input.
;; - wirepool_encode, wirepool_tick: nothing.
(module
  ;; Layout: the input buffer starts at 64 KiB; the output follows the input (8-aligned).
  ;; wirepool_buffer grows the memory so the output has room for four times the input
  ;; plus 64 bytes (a decode writes at most two 25-byte records per 8-byte frame header).
  (memory (export "memory") 2)
  (global $input i32 (i32.const 0x10000))
  (global $output (mut i32) (i32.const 0x10000))
  (global $output_len (mut i32) (i32.const 0))
  (global $features (mut i32) (i32.const 0))

  (func (export "wirepool_abi_version") (result i32)
    (i32.const 1))

  (func (export "wirepool_engine_features") (param $features i32)
    (global.set $features (local.get $features)))

  (func (export "wirepool_buffer") (param $size i32) (result i32)
    (local $pages i32)
    (if (i32.gt_u (local.get $size) (i32.const 0x800000))
      (then (return (i32.const 0))))
    (global.set $output
      (i32.add (global.get $input)
        (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.set $pages
      (i32.shr_u
        (i32.add
          (i32.add (global.get $output)
            (i32.add (i32.mul (local.get $size) (i32.const 7)) (i32.const 64)))
          (i32.const 0xffff))
        (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then (return (i32.const 0))))))
    (global.get $input))

  ;; Writes a record header at $at.
  (func $header (param $at i32) (param $kind i32) (param $channel_len i32)
                (param $payload_len i32) (param $id i64)
    (i32.store (local.get $at) (local.get $kind))
    (i32.store offset=4 (local.get $at) (local.get $channel_len))
    (i32.store offset=8 (local.get $at) (local.get $payload_len))
    (i32.store offset=12 (local.get $at) (i32.const 0))
    (i64.store offset=16 (local.get $at) (local.get $id)))

  ;; Writes a DATA_IN_INPUT record on channel "t" at $at: no payload bytes, the message's
  ;; $len bytes at input offset $offset.
  (func $reference (param $at i32) (param $offset i32) (param $len i32)
    (call $header (local.get $at) (i32.const 17) (i32.const 1) (i32.const 0)
      (i64.extend_i32_u (local.get $offset)))
    (i32.store offset=12 (local.get $at) (local.get $len))
    (i32.store8 offset=24 (local.get $at) (i32.const 0x74)))

  (func (export "wirepool_init") (param $config_len i32) (param $token_len i32) (result i32)
    (global.set $output_len (i32.const 0))
    (if (result i32) (i32.and (global.get $features) (i32.const 1))
      (then (i32.const 0))
      (else (i32.const 7))))

  (func (export "wirepool_open") (result i32)
    (call $header (global.get $output) (i32.const 3) (i32.const 0) (i32.const 0) (i64.const 0))
    (global.set $output_len (i32.const 24))
    (i32.const 0))

  (func (export "wirepool_decode") (param $count i32) (param $total_len i32) (result i32)
    (local $in i32)
    (local $out i32)
    (local $len i32)
    (local $index i32)
    (local.set $in (global.get $input))
    (local.set $out (global.get $output))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $index) (local.get $count)))
        (local.set $len (i32.load (local.get $in)))
        ;; The body's offset from the input's start.
        (call $reference (local.get $out)
          (i32.add (i32.sub (local.get $in) (global.get $input)) (i32.const 8))
          (local.get $len))
        (local.set $out (i32.add (local.get $out) (i32.const 25)))
        ;; The misbehaviour under test: after a frame starting with 'X', a record one
        ;; byte past the input.
        (if (i32.gt_u (local.get $len) (i32.const 0))
          (then
            (if (i32.eq (i32.load8_u offset=8 (local.get $in)) (i32.const 0x58))
              (then
                (call $reference (local.get $out) (local.get $total_len) (i32.const 1))
                (local.set $out (i32.add (local.get $out) (i32.const 25)))))))
        (local.set $in (i32.add (local.get $in) (i32.add (i32.const 8) (local.get $len))))
        (local.set $index (i32.add (local.get $index) (i32.const 1)))
        (br $next)))
    (global.set $output_len (i32.sub (local.get $out) (global.get $output)))
    (i32.const 0))

  (func (export "wirepool_encode") (param $op i32) (param $id i64) (param $channel_len i32)
                                   (param $payload_len i32) (result i32)
    (global.set $output_len (i32.const 0))
    (i32.const 0))

  (func (export "wirepool_tick") (param $now_ms i64) (result i32)
    (global.set $output_len (i32.const 0))
    (i32.const 0))

  (func (export "wirepool_output") (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (global.get $output)) (i64.const 32))
      (i64.extend_i32_u (global.get $output_len)))))
