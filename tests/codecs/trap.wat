;; A codec that traps: a minimal working ABI v1 codec, except that wirepool_decode
;; executes `unreachable` when a frame's body starts with 'X' (0x58), and
;; wirepool_encode does when a request's payload or a subscription's channel does.
;; With the config `"bad_output"`, decode does not trap on such a frame: it writes the
;; frame's record as usual and, after the batch's records, a header whose payload
;; length runs past the end of the output; with `"auth_failed_then_bad_output"`, an
;; AUTH_FAILED record before that header.
;;
;; Otherwise: wirepool_open emits READY; wirepool_encode SUBSCRIBE emits SUBSCRIBED with
;; the channel and the command id (other ops emit nothing); wirepool_decode emits one
;; DATA record on channel "t" per frame, the payload being the frame body.
(module
  ;; Layout: the input buffer starts at 64 KiB; the output follows the input (8-aligned).
  ;; wirepool_buffer grows the memory so the output has room for four times the input
  ;; plus 64 bytes, which bounds every record this module writes (a decode turns each
  ;; 8-byte frame header into a 25-byte record header + channel).
  (memory (export "memory") 2)
  (global $input i32 (i32.const 0x10000))
  (global $output (mut i32) (i32.const 0x10000))
  (global $output_len (mut i32) (i32.const 0))
  ;; 1: the config was `"bad_output"`; 2: `"auth_failed_then_bad_output"` (told apart
  ;; by their second byte).
  (global $bad_output (mut i32) (i32.const 0))

  (func (export "wirepool_abi_version") (result i32)
    (i32.const 1))

  (func (export "wirepool_buffer") (param $size i32) (result i32)
    (local $pages i32)
    ;; Refuse negative sizes and anything over 8 MiB.
    (if (i32.gt_u (local.get $size) (i32.const 0x800000))
      (then (return (i32.const 0))))
    (global.set $output
      (i32.add (global.get $input)
        (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.set $pages
      (i32.shr_u
        (i32.add
          (i32.add (global.get $output)
            (i32.add (i32.mul (local.get $size) (i32.const 4)) (i32.const 64)))
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

  (func (export "wirepool_init") (param $config_len i32) (param $token_len i32) (result i32)
    (global.set $output_len (i32.const 0))
    (if (i32.gt_u (local.get $config_len) (i32.const 1))
      (then
        (if (i32.eq (i32.load8_u offset=1 (global.get $input)) (i32.const 0x62))
          (then (global.set $bad_output (i32.const 1))))
        (if (i32.eq (i32.load8_u offset=1 (global.get $input)) (i32.const 0x61))
          (then (global.set $bad_output (i32.const 2))))))
    (i32.const 0))

  ;; READY at once.
  (func (export "wirepool_open") (result i32)
    (call $header (global.get $output) (i32.const 3) (i32.const 0) (i32.const 0) (i64.const 0))
    (global.set $output_len (i32.const 24))
    (i32.const 0))

  ;; One DATA record on channel "t" per frame, payload = the frame body.
  (func (export "wirepool_decode") (param $count i32) (param $total_len i32) (result i32)
    (local $in i32)
    (local $out i32)
    (local $len i32)
    (local $index i32)
    (local $broken i32)
    (local.set $in (global.get $input))
    (local.set $out (global.get $output))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $index) (local.get $count)))
        (local.set $len (i32.load (local.get $in)))
        ;; The misbehaviour under test: a frame starting with 'X'.
        (if (i32.gt_u (local.get $len) (i32.const 0))
          (then
            (if (i32.eq (i32.load8_u offset=8 (local.get $in)) (i32.const 0x58))
              (then
                (if (i32.eqz (global.get $bad_output)) (then unreachable))
                (local.set $broken (i32.const 1))))))
        (call $header (local.get $out) (i32.const 4) (i32.const 1) (local.get $len) (i64.const 0))
        (i32.store8 offset=24 (local.get $out) (i32.const 0x74))
        (memory.copy
          (i32.add (local.get $out) (i32.const 25))
          (i32.add (local.get $in) (i32.const 8))
          (local.get $len))
        (local.set $out (i32.add (local.get $out) (i32.add (i32.const 25) (local.get $len))))
        (local.set $in (i32.add (local.get $in) (i32.add (i32.const 8) (local.get $len))))
        (local.set $index (i32.add (local.get $index) (i32.const 1)))
        (br $next)))
    ;; After the good records: a DATA header claiming 2 GiB of payload (after an
    ;; AUTH_FAILED record without a reason, in the second mode).
    (if (i32.and (local.get $broken) (i32.eq (global.get $bad_output) (i32.const 2)))
      (then
        (call $header (local.get $out) (i32.const 13) (i32.const 0) (i32.const 0) (i64.const 0))
        (local.set $out (i32.add (local.get $out) (i32.const 24)))))
    (if (local.get $broken)
      (then
        (call $header (local.get $out) (i32.const 4) (i32.const 0) (i32.const 0x7fffffff)
          (i64.const 0))
        (local.set $out (i32.add (local.get $out) (i32.const 24)))))
    (global.set $output_len (i32.sub (local.get $out) (global.get $output)))
    (i32.const 0))

  ;; SUBSCRIBE (op 1): SUBSCRIBED with the channel and the command id; nothing else.
  (func (export "wirepool_encode") (param $op i32) (param $id i64) (param $channel_len i32)
                                   (param $payload_len i32) (result i32)
    (global.set $output_len (i32.const 0))
    ;; The misbehaviour under test: a request whose payload starts with 'X'.
    (if (i32.and (i32.eq (local.get $op) (i32.const 3))
                 (i32.gt_u (local.get $payload_len) (i32.const 0)))
      (then
        (if (i32.eq (i32.load8_u (i32.add (global.get $input) (local.get $channel_len)))
                    (i32.const 0x58))
          (then unreachable))))
    ;; And a subscription whose channel starts with 'X'.
    (if (i32.and (i32.eq (local.get $op) (i32.const 1))
                 (i32.gt_u (local.get $channel_len) (i32.const 0)))
      (then
        (if (i32.eq (i32.load8_u (global.get $input)) (i32.const 0x58))
          (then unreachable))))
    (if (i32.eq (local.get $op) (i32.const 1))
      (then
        (call $header (global.get $output) (i32.const 7) (local.get $channel_len) (i32.const 0)
          (local.get $id))
        (memory.copy
          (i32.add (global.get $output) (i32.const 24))
          (global.get $input)
          (local.get $channel_len))
        (global.set $output_len (i32.add (i32.const 24) (local.get $channel_len)))))
    (i32.const 0))

  (func (export "wirepool_tick") (param $now_ms i64) (result i32)
    (global.set $output_len (i32.const 0))
    (i32.const 0))

  (func (export "wirepool_output") (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (global.get $output)) (i64.const 32))
      (i64.extend_i32_u (global.get $output_len)))))
