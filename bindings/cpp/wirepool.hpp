// wirepool C++17 wrapper: header-only, move-only RAII types over the C ABI in
// include/wirepool.h (conventions in docs/c-api.md).
//
// Every C handle has exactly one owner here: `Pool` owns a wirepool_pool, `Batch` a
// wirepool_batch, `Bytes` a wirepool_bytes, `PendingRequest` a wirepool_pending_request. Copying is disabled; moving transfers the
// handle and leaves the source empty (using an empty object throws `Error` with
// `ErrorCode::NullArgument`). Failing C calls become exceptions derived from
// `wirepool::Error`, chosen by result code, whose message is wirepool_last_error().
//
// Threads: a `Pool` may be used from many threads at once, which is why its methods
// are const, like the C functions' `const wirepool_pool *` (`close()` wakes every
// blocked call), except that it must not be destroyed or moved while another thread
// uses it. A `Batch` belongs to one thread at a time; the `MessageView`s it yields
// stay valid until the next `Pool::poll` with that batch or its destruction. So does a
// `PendingRequest` (it may move to another thread, and may outlive its `Pool`).
//
//     wirepool::Pool pool(R"({"servers":[{"url":"ws://127.0.0.1:9000"}]})");
//     pool.wait_ready(std::chrono::seconds(10));
//     pool.subscribe("ticker.0");
//     wirepool::Batch batch(256);
//     while (running) {
//         pool.poll(batch, std::chrono::milliseconds(100));  // 0 messages on timeout
//         for (const wirepool::MessageView &m : batch) { use(m.channel, m.payload); }
//     }

#ifndef WIREPOOL_HPP
#define WIREPOOL_HPP

#include <wirepool.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace wirepool {

/// The C result codes, by name. Values come from the header, so a renamed or removed
/// code is a compile error here rather than a silent mismatch.
enum class ErrorCode : std::uint32_t {
    Ok = WIREPOOL_OK,
    /// Not an error: a submitted request has not finished yet (PendingRequest::wait).
    Pending = WIREPOOL_PENDING,
    NullArgument = WIREPOOL_ERR_NULL_ARGUMENT,
    InvalidUtf8 = WIREPOOL_ERR_INVALID_UTF8,
    InvalidArgument = WIREPOOL_ERR_INVALID_ARGUMENT,
    Config = WIREPOOL_ERR_CONFIG,
    Timeout = WIREPOOL_ERR_TIMEOUT,
    Closed = WIREPOOL_ERR_CLOSED,
    ConnectionLost = WIREPOOL_ERR_CONNECTION_LOST,
    Remote = WIREPOOL_ERR_REMOTE,
    Codec = WIREPOOL_ERR_CODEC,
    Io = WIREPOOL_ERR_IO,
    Tls = WIREPOOL_ERR_TLS,
    Protocol = WIREPOOL_ERR_PROTOCOL,
    Panic = WIREPOOL_ERR_PANIC,
    Internal = WIREPOOL_ERR_INTERNAL,
};

/// The static text of a result code (wirepool_result_text), e.g. "timed out".
[[nodiscard]] inline std::string_view code_text(ErrorCode code) noexcept {
    const char *text = wirepool_result_text(static_cast<std::uint32_t>(code));
    return text != nullptr ? std::string_view(text) : std::string_view();
}

/// The library's version string (wirepool_version).
[[nodiscard]] inline std::string_view version() noexcept {
    const char *text = wirepool_version();
    return text != nullptr ? std::string_view(text) : std::string_view();
}

/// Any failure reported by wirepool. `what()` is the detailed message from
/// wirepool_last_error() (falling back to the code's text), prefixed with the C call.
class Error : public std::runtime_error {
public:
    Error(ErrorCode code, const std::string &message)
        : std::runtime_error(message), code_(code) {}

    [[nodiscard]] ErrorCode code() const noexcept { return code_; }
    [[nodiscard]] std::uint32_t raw_code() const noexcept {
        return static_cast<std::uint32_t>(code_);
    }

private:
    ErrorCode code_;
};

/// The configuration is invalid; the message names the key path.
class ConfigError : public Error {
public:
    using Error::Error;
};

/// A request or wait ran out of time.
class TimeoutError : public Error {
public:
    using Error::Error;
};

/// The pool is closed (possibly by `close()` from another thread).
class ClosedError : public Error {
public:
    using Error::Error;
};

/// A non-idempotent request's connection died: the venue may or may not have
/// received it. wirepool never replays such a request by itself.
class ConnectionLostError : public Error {
public:
    using Error::Error;
};

/// The venue answered a request with an error; `payload()` is its error payload.
class RemoteError : public Error {
public:
    RemoteError(ErrorCode code, const std::string &message, std::string payload)
        : Error(code, message), payload_(std::move(payload)) {}

    [[nodiscard]] const std::string &payload() const noexcept { return payload_; }

private:
    std::string payload_;
};

/// Owns one wirepool_bytes (a reply, stats or events JSON) until destruction.
class Bytes {
public:
    Bytes() noexcept = default;
    /// Takes ownership of `raw` (may be null).
    explicit Bytes(wirepool_bytes *raw) noexcept : raw_(raw) {}
    ~Bytes() { wirepool_bytes_free(raw_); }

    Bytes(const Bytes &) = delete;
    Bytes &operator=(const Bytes &) = delete;
    Bytes(Bytes &&other) noexcept : raw_(std::exchange(other.raw_, nullptr)) {}
    Bytes &operator=(Bytes &&other) noexcept {
        if (this != &other) {
            wirepool_bytes_free(raw_);
            raw_ = std::exchange(other.raw_, nullptr);
        }
        return *this;
    }

    [[nodiscard]] const std::uint8_t *data() const noexcept {
        return raw_ != nullptr ? wirepool_bytes_data(raw_) : nullptr;
    }
    [[nodiscard]] std::size_t size() const noexcept {
        return raw_ != nullptr ? wirepool_bytes_len(raw_) : 0;
    }
    [[nodiscard]] bool empty() const noexcept { return size() == 0; }
    /// The bytes as text, valid while this object lives.
    [[nodiscard]] std::string_view view() const noexcept {
        const std::size_t len = size();
        const std::uint8_t *ptr = data();
        if (ptr == nullptr || len == 0) {
            return std::string_view();
        }
        return std::string_view(reinterpret_cast<const char *>(ptr), len);
    }
    [[nodiscard]] std::string str() const { return std::string(view()); }

    [[nodiscard]] wirepool_bytes *raw() const noexcept { return raw_; }
    /// Gives up ownership; the caller must wirepool_bytes_free the result.
    [[nodiscard]] wirepool_bytes *release() noexcept { return std::exchange(raw_, nullptr); }

private:
    wirepool_bytes *raw_ = nullptr;
};

namespace detail {

// wirepool_last_error() is only valid until the next wirepool call on this thread, so
// it is copied before anything else (such as reading a remote reply) calls in again.
inline std::string last_error_message(const char *call, std::uint32_t code) {
    std::string message(call);
    message += ": ";
    const char *detail = wirepool_last_error();
    if (detail != nullptr && detail[0] != '\0') {
        message += detail;
    } else {
        const char *text = wirepool_result_text(code);
        message += text != nullptr ? text : "unknown wirepool error";
        message += " (code " + std::to_string(code) + ")";
    }
    return message;
}

/// Throws the exception matching `code`. For WIREPOOL_ERR_REMOTE, `reply` (owned here)
/// is the venue's error payload.
[[noreturn]] inline void throw_error(const char *call, std::uint32_t code,
                                     wirepool_bytes *reply = nullptr) {
    Bytes owned_reply(reply);
    const std::string message = last_error_message(call, code);
    const auto typed = static_cast<ErrorCode>(code);
    switch (typed) {
    case ErrorCode::Config:
        throw ConfigError(typed, message);
    case ErrorCode::Timeout:
        throw TimeoutError(typed, message);
    case ErrorCode::Closed:
        throw ClosedError(typed, message);
    case ErrorCode::ConnectionLost:
        throw ConnectionLostError(typed, message);
    case ErrorCode::Remote:
        throw RemoteError(typed, message, owned_reply.str());
    default:
        throw Error(typed, message);
    }
}

inline void check(const char *call, std::uint32_t code) {
    if (code != static_cast<std::uint32_t>(WIREPOOL_OK)) {
        throw_error(call, code);
    }
}

/// Milliseconds as the C API's uint32_t: negative becomes 0, too large saturates.
[[nodiscard]] inline std::uint32_t to_timeout_ms(std::chrono::milliseconds timeout) noexcept {
    const auto count = timeout.count();
    if (count <= 0) {
        return 0;
    }
    constexpr auto max_ms = std::numeric_limits<std::uint32_t>::max();
    if (static_cast<unsigned long long>(count) >= max_ms) {
        return max_ms;
    }
    return static_cast<std::uint32_t>(count);
}

/// A NUL-terminated copy of `text`. An embedded NUL would silently cut the string
/// short in C, so it is refused here.
[[nodiscard]] inline std::string c_string(const char *call, std::string_view what,
                                          std::string_view text) {
    if (text.find('\0') != std::string_view::npos) {
        std::string message(call);
        message += ": ";
        message += what;
        message += " contains a NUL byte";
        throw Error(ErrorCode::InvalidArgument, message);
    }
    return std::string(text);
}

/// `text` as a JSON string literal (quotes, backslashes and control bytes escaped).
[[nodiscard]] inline std::string json_quote(std::string_view text) {
    static const char hex[] = "0123456789abcdef";
    std::string out = "\"";
    for (const char c : text) {
        const auto byte = static_cast<unsigned char>(c);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += c;
        } else if (byte < 0x20) {
            out += "\\u00";
            out += hex[byte >> 4];
            out += hex[byte & 0xf];
        } else {
            out += c;
        }
    }
    out += '"';
    return out;
}

/// The value of member `key` in `json`, a flat object as wirepool writes it (numbers,
/// and strings without escapes), without its quotes. Throws `Error` (Internal) when
/// it is not there: the library and this header disagree.
[[nodiscard]] inline std::string_view json_member(const char *call, std::string_view json,
                                                  std::string_view key) {
    const std::string needle = "\"" + std::string(key) + "\":";
    const std::size_t at = json.find(needle);
    std::size_t start = at == std::string_view::npos ? at : at + needle.size();
    while (start < json.size() && json[start] == ' ') {
        ++start;
    }
    std::size_t end = std::string_view::npos;
    if (start < json.size() && json[start] == '"') {
        ++start;
        end = json.find('"', start);
    } else if (start < json.size()) {
        end = json.find_first_of(",}", start);
    }
    if (end == std::string_view::npos) {
        throw Error(ErrorCode::Internal, std::string(call) + ": no \"" + std::string(key) +
                                             "\" in " + std::string(json));
    }
    return json.substr(start, end - start);
}

/// A member of `json` that holds a count from 0 to 2^32 - 1.
[[nodiscard]] inline std::uint32_t json_count(const char *call, std::string_view json,
                                              std::string_view key) {
    const std::string_view digits = json_member(call, json, key);
    std::uint64_t value = 0;
    bool valid = !digits.empty() && digits.size() <= 10;
    for (const char c : digits) {
        valid = valid && c >= '0' && c <= '9';
        value = value * 10 + static_cast<std::uint64_t>(c - '0');
    }
    if (!valid || value > std::numeric_limits<std::uint32_t>::max()) {
        throw Error(ErrorCode::Internal, std::string(call) + ": \"" + std::string(key) +
                                             "\" is not a count in " + std::string(json));
    }
    return static_cast<std::uint32_t>(value);
}

[[noreturn]] inline void throw_moved_from(const char *type) {
    throw Error(ErrorCode::NullArgument,
                std::string("wirepool::") + type + ": used after move (no handle)");
}

} // namespace detail

/// One received message, borrowed from a `Batch`: valid until the next `Pool::poll`
/// with that batch or the batch's destruction. Copy the views to keep the data.
struct MessageView {
    std::string_view channel;
    /// The payload bytes (for the json codec, the JSON text of the frame's payload).
    std::string_view payload;
    std::uint64_t connection_id = 0;
    /// CLOCK_REALTIME nanoseconds when the frame was read.
    std::uint64_t received_ns = 0;
    /// WIREPOOL_MESSAGE_DATA (0) for data messages.
    std::uint32_t kind = 0;
};

/// Owns one wirepool_batch: a reusable buffer that `Pool::poll` fills. Iterate it as a
/// range of `MessageView`.
class Batch {
public:
    class iterator {
    public:
        using iterator_category = std::random_access_iterator_tag;
        using value_type = MessageView;
        using difference_type = std::ptrdiff_t;
        using pointer = void;
        using reference = MessageView;

        iterator() noexcept = default;
        explicit iterator(const wirepool_message *at) noexcept : at_(at) {}

        [[nodiscard]] MessageView operator*() const noexcept { return view(*at_); }
        [[nodiscard]] MessageView operator[](difference_type n) const noexcept {
            return view(at_[n]);
        }
        iterator &operator++() noexcept { ++at_; return *this; }
        iterator operator++(int) noexcept { iterator old = *this; ++at_; return old; }
        iterator &operator--() noexcept { --at_; return *this; }
        iterator operator--(int) noexcept { iterator old = *this; --at_; return old; }
        iterator &operator+=(difference_type n) noexcept { at_ += n; return *this; }
        iterator &operator-=(difference_type n) noexcept { at_ -= n; return *this; }
        [[nodiscard]] friend iterator operator+(iterator it, difference_type n) noexcept {
            return it += n;
        }
        [[nodiscard]] friend iterator operator+(difference_type n, iterator it) noexcept {
            return it += n;
        }
        [[nodiscard]] friend iterator operator-(iterator it, difference_type n) noexcept {
            return it -= n;
        }
        [[nodiscard]] friend difference_type operator-(iterator a, iterator b) noexcept {
            return a.at_ - b.at_;
        }
        [[nodiscard]] friend bool operator==(iterator a, iterator b) noexcept { return a.at_ == b.at_; }
        [[nodiscard]] friend bool operator!=(iterator a, iterator b) noexcept { return a.at_ != b.at_; }
        [[nodiscard]] friend bool operator<(iterator a, iterator b) noexcept { return a.at_ < b.at_; }
        [[nodiscard]] friend bool operator>(iterator a, iterator b) noexcept { return a.at_ > b.at_; }
        [[nodiscard]] friend bool operator<=(iterator a, iterator b) noexcept { return a.at_ <= b.at_; }
        [[nodiscard]] friend bool operator>=(iterator a, iterator b) noexcept { return a.at_ >= b.at_; }

    private:
        static MessageView view(const wirepool_message &m) noexcept {
            MessageView out;
            if (m.channel != nullptr && m.channel_len != 0) {
                out.channel = std::string_view(m.channel, m.channel_len);
            }
            if (m.payload != nullptr && m.payload_len != 0) {
                out.payload = std::string_view(reinterpret_cast<const char *>(m.payload),
                                               m.payload_len);
            }
            out.connection_id = m.connection_id;
            out.received_ns = m.received_ns;
            out.kind = static_cast<std::uint32_t>(m.kind);
            return out;
        }

        const wirepool_message *at_ = nullptr;
    };
    using const_iterator = iterator;

    /// A batch that holds up to `capacity` messages per poll (must be > 0).
    explicit Batch(std::size_t capacity) : capacity_(capacity) {
        wirepool_batch *raw = nullptr;
        detail::check("wirepool_batch_new", static_cast<std::uint32_t>(wirepool_batch_new(capacity, &raw)));
        raw_ = raw;
    }
    ~Batch() { wirepool_batch_free(raw_); }

    Batch(const Batch &) = delete;
    Batch &operator=(const Batch &) = delete;
    Batch(Batch &&other) noexcept
        : raw_(std::exchange(other.raw_, nullptr)),
          count_(std::exchange(other.count_, 0)),
          capacity_(std::exchange(other.capacity_, 0)) {}
    Batch &operator=(Batch &&other) noexcept {
        if (this != &other) {
            wirepool_batch_free(raw_);
            raw_ = std::exchange(other.raw_, nullptr);
            count_ = std::exchange(other.count_, 0);
            capacity_ = std::exchange(other.capacity_, 0);
        }
        return *this;
    }

    /// Messages filled by the last poll.
    [[nodiscard]] std::size_t size() const noexcept { return count_; }
    [[nodiscard]] bool empty() const noexcept { return count_ == 0; }
    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }

    [[nodiscard]] iterator begin() const noexcept { return iterator(messages()); }
    [[nodiscard]] iterator end() const noexcept {
        const wirepool_message *first = messages();
        return iterator(first != nullptr ? first + count_ : nullptr);
    }
    /// The i-th message of the last poll; `i < size()`.
    [[nodiscard]] MessageView operator[](std::size_t i) const noexcept {
        return begin()[static_cast<std::ptrdiff_t>(i)];
    }

    /// The batch's contiguous data area: the payloads back to back in message order
    /// from its start, then the channel names (see wirepool_message::channel_offset /
    /// payload_offset, and docs/c-api.md). A copy made on the first call after a poll:
    /// reading messages through their views costs no copy.
    [[nodiscard]] std::string_view data() const noexcept {
        if (raw_ == nullptr || count_ == 0) {
            return std::string_view();
        }
        std::size_t len = 0;
        const std::uint8_t *ptr = wirepool_batch_data(raw_, &len);
        if (ptr == nullptr || len == 0) {
            return std::string_view();
        }
        return std::string_view(reinterpret_cast<const char *>(ptr), len);
    }

    [[nodiscard]] wirepool_batch *raw() const noexcept { return raw_; }

private:
    friend class Pool;

    const wirepool_message *messages() const noexcept {
        if (raw_ == nullptr || count_ == 0) {
            return nullptr;
        }
        return wirepool_batch_messages(raw_);
    }

    wirepool_batch *raw_ = nullptr;
    std::size_t count_ = 0;
    std::size_t capacity_ = 0;
};

/// Owns one wirepool_pending_request: a request sent with `Pool::submit`, whose reply is
/// collected later with `wait` (from this thread or another, one at a time). Destroying
/// it (or `cancel()`) before the request finished withdraws the request, as a timeout
/// does: one the rate limit still held is never written. The request's timeout runs
/// from the submit however the waits are sliced. It may outlive its `Pool`: once the
/// pool is closed, `wait` gives the outcome the request already had, or throws
/// `ClosedError`.
///
///     wirepool::PendingRequest order = pool.submit(body, std::chrono::seconds(2));
///     // ... each turn of the event loop:
///     if (std::optional<std::string> ack = order.wait(std::chrono::milliseconds(0))) {
///         use(*ack);  // a failed request threw instead, as Pool::request does
///     }
class PendingRequest {
public:
    PendingRequest() noexcept = default;
    /// Takes ownership of `raw` (may be null).
    explicit PendingRequest(wirepool_pending_request *raw) noexcept : raw_(raw) {}
    ~PendingRequest() { wirepool_pending_request_free(raw_); }

    PendingRequest(const PendingRequest &) = delete;
    PendingRequest &operator=(const PendingRequest &) = delete;
    PendingRequest(PendingRequest &&other) noexcept : raw_(std::exchange(other.raw_, nullptr)) {}
    PendingRequest &operator=(PendingRequest &&other) noexcept {
        if (this != &other) {
            wirepool_pending_request_free(raw_);
            raw_ = std::exchange(other.raw_, nullptr);
        }
        return *this;
    }

    /// Waits up to `max_wait` (0: only looks) for the request to finish. std::nullopt:
    /// not finished yet, and its deadline has not passed. Otherwise the reply; a failed
    /// request throws what `Pool::request` throws (`RemoteError` with the venue's error
    /// payload, `TimeoutError` once its deadline has passed, `ConnectionLostError`,
    /// `ClosedError`, `Error`). Once finished, every later call returns (or throws) the
    /// same at once.
    [[nodiscard]] std::optional<std::string> wait(std::chrono::milliseconds max_wait) {
        wirepool_bytes *reply = nullptr;
        const auto code = static_cast<std::uint32_t>(wirepool_pending_request_wait(
            handle(), detail::to_timeout_ms(max_wait), &reply));
        if (code == static_cast<std::uint32_t>(WIREPOOL_PENDING)) {
            return std::nullopt;
        }
        if (code != static_cast<std::uint32_t>(WIREPOOL_OK)) {
            detail::throw_error("wirepool_pending_request_wait", code, reply);
        }
        return Bytes(reply).str();
    }

    /// Waits until the request finishes (by its own deadline at the latest): the reply,
    /// or the exception `wait` would throw.
    [[nodiscard]] std::string get() {
        const std::chrono::milliseconds forever(std::numeric_limits<std::uint32_t>::max());
        for (;;) {
            if (std::optional<std::string> reply = wait(forever)) {
                return std::move(*reply);
            }
        }
    }

    /// True once the request has finished (replied, failed, timed out, or its pool
    /// closed); its outcome stays for `wait` and `get`. Never throws for a failed request.
    [[nodiscard]] bool finished() {
        wirepool_bytes *reply = nullptr;
        const auto code = static_cast<std::uint32_t>(
            wirepool_pending_request_wait(handle(), 0, &reply));
        wirepool_bytes_free(reply);
        return code != static_cast<std::uint32_t>(WIREPOOL_PENDING);
    }

    /// The request's id, unique within its pool (the json codec's `messageId` is
    /// `r<id>`); 0 for an empty object.
    [[nodiscard]] std::uint64_t id() const noexcept { return wirepool_pending_request_id(raw_); }

    /// Withdraws the request if it has not finished, and frees the handle (as the
    /// destructor does); the object is empty afterwards.
    void cancel() noexcept { wirepool_pending_request_free(std::exchange(raw_, nullptr)); }

    [[nodiscard]] wirepool_pending_request *raw() const noexcept { return raw_; }

private:
    wirepool_pending_request *handle() const {
        if (raw_ == nullptr) {
            detail::throw_moved_from("PendingRequest");
        }
        return raw_;
    }

    wirepool_pending_request *raw_ = nullptr;
};

/// A pool's run-time settings (`Pool::settings`), as GET /api/v1/pool/config shows them.
struct Settings {
    /// Connections kept open.
    std::uint32_t min_connections = 0;
    /// Upper bound for added connections.
    std::uint32_t max_connections = 0;
    /// How new connections pick a server: "round_robin", "least_connections",
    /// "weighted" or "random".
    std::string strategy;
};

/// A change for `Pool::reconfigure`: the fields set change, the others keep their value.
///
///     wirepool::SettingsChange change;
///     change.min_connections = 4;
///     pool.reconfigure(change);
struct SettingsChange {
    std::optional<std::uint32_t> min_connections;
    std::optional<std::uint32_t> max_connections;
    /// "round_robin", "least_connections", "weighted" or "random".
    std::optional<std::string> strategy;
};

/// Owns one wirepool_pool. The destructor closes it, joins its threads and frees it.
class Pool {
public:
    /// Builds a pool from a JSON configuration (SPEC section 5); throws `ConfigError`
    /// naming the key path when it is invalid. Connections start in the background;
    /// see `wait_ready`.
    explicit Pool(std::string_view config_json) {
        const std::string config =
            detail::c_string("wirepool_pool_new", "config JSON", config_json);
        wirepool_pool *raw = nullptr;
        detail::check("wirepool_pool_new",
                      static_cast<std::uint32_t>(wirepool_pool_new(config.c_str(), &raw)));
        raw_ = raw;
    }
    ~Pool() { wirepool_pool_free(raw_); }

    Pool(const Pool &) = delete;
    Pool &operator=(const Pool &) = delete;
    Pool(Pool &&other) noexcept : raw_(std::exchange(other.raw_, nullptr)) {}
    Pool &operator=(Pool &&other) noexcept {
        if (this != &other) {
            wirepool_pool_free(raw_);
            raw_ = std::exchange(other.raw_, nullptr);
        }
        return *this;
    }

    /// Closes the pool (idempotent, callable from any thread): every blocked call
    /// returns with `ClosedError`; `poll` drains what is queued first.
    void close() const {
        detail::check("wirepool_pool_close",
                      static_cast<std::uint32_t>(wirepool_pool_close(handle())));
    }

    /// Waits until the pool is ready (min_connections sessions ready); throws
    /// `TimeoutError` when `timeout` passes first.
    void wait_ready(std::chrono::milliseconds timeout) const {
        detail::check("wirepool_pool_wait_ready",
                      static_cast<std::uint32_t>(wirepool_pool_wait_ready(
                          handle(), detail::to_timeout_ms(timeout))));
    }

    /// Adds `channel` to the desired subscriptions; it is sent once a connection is
    /// ready and re-sent after reconnects.
    void subscribe(std::string_view channel) const {
        const std::string name = detail::c_string("wirepool_pool_subscribe", "channel", channel);
        detail::check("wirepool_pool_subscribe",
                      static_cast<std::uint32_t>(wirepool_pool_subscribe(handle(), name.c_str())));
    }

    void unsubscribe(std::string_view channel) const {
        const std::string name =
            detail::c_string("wirepool_pool_unsubscribe", "channel", channel);
        detail::check("wirepool_pool_unsubscribe",
                      static_cast<std::uint32_t>(wirepool_pool_unsubscribe(handle(), name.c_str())));
    }

    /// Sends `payload` (a JSON document for the json codec) as a request and returns
    /// the reply payload. A `timeout` of 0 ms (or less) means the config's
    /// `request_timeout_ms`. Throws `RemoteError` (with the venue's error payload),
    /// `TimeoutError`, `ConnectionLostError` (only when `idempotent` is false: the
    /// venue may or may not have received it), `ClosedError`, or `Error`.
    [[nodiscard]] std::string request(std::string_view payload,
                                      std::chrono::milliseconds timeout,
                                      bool idempotent = false) const {
        const std::uint32_t flags =
            idempotent ? static_cast<std::uint32_t>(WIREPOOL_REQUEST_IDEMPOTENT) : 0u;
        wirepool_bytes *reply = nullptr;
        const auto code = static_cast<std::uint32_t>(wirepool_pool_request(
            handle(), reinterpret_cast<const std::uint8_t *>(payload.data()), payload.size(),
            detail::to_timeout_ms(timeout), flags, &reply));
        if (code != static_cast<std::uint32_t>(WIREPOOL_OK)) {
            // On WIREPOOL_ERR_REMOTE `reply` holds the error payload; on other codes the
            // C API leaves it untouched (null), and throw_error frees it either way.
            detail::throw_error("wirepool_pool_request", code, reply);
        }
        return Bytes(reply).str();
    }

    /// Sends `payload` as `request` does, without waiting for the reply: the returned
    /// `PendingRequest` collects it later, so no thread is held per outstanding request.
    /// `timeout` (0 ms or less: the config's `request_timeout_ms`) runs from now. Throws
    /// at once, with nothing sent, when the pool is closed (`ClosedError`) or the payload
    /// is too long (`Error`, InvalidArgument).
    [[nodiscard]] PendingRequest submit(std::string_view payload,
                                        std::chrono::milliseconds timeout,
                                        bool idempotent = false) const {
        const std::uint32_t flags =
            idempotent ? static_cast<std::uint32_t>(WIREPOOL_REQUEST_IDEMPOTENT) : 0u;
        wirepool_pending_request *request = nullptr;
        detail::check("wirepool_pool_request_submit",
                      static_cast<std::uint32_t>(wirepool_pool_request_submit(
                          handle(), reinterpret_cast<const std::uint8_t *>(payload.data()),
                          payload.size(), detail::to_timeout_ms(timeout), flags, &request)));
        return PendingRequest(request);
    }

    /// Waits up to `timeout` for at least one message, then fills `batch` with as many
    /// as are queued (up to its capacity). Returns the count (also `batch.size()`); 0 on
    /// timeout. Views from the batch's previous poll become invalid. Throws
    /// `ClosedError` once the pool is closed and drained.
    std::size_t poll(Batch &batch, std::chrono::milliseconds timeout) const {
        if (batch.raw_ == nullptr) {
            detail::throw_moved_from("Batch");
        }
        batch.count_ = 0;
        std::size_t count = 0;
        detail::check("wirepool_pool_poll",
                      static_cast<std::uint32_t>(wirepool_pool_poll(
                          handle(), batch.raw_, detail::to_timeout_ms(timeout), &count)));
        batch.count_ = count;
        return count;
    }

    /// A descriptor (owned by the pool; do not close it) that is readable while
    /// messages are queued, for epoll/select.
    [[nodiscard]] int fd() const {
        int out = -1;
        detail::check("wirepool_pool_fd",
                      static_cast<std::uint32_t>(wirepool_pool_fd(handle(), &out)));
        return out;
    }

    /// The stats object (same JSON as GET /api/v1/pool/stats).
    [[nodiscard]] std::string stats_json() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_stats_json",
                      static_cast<std::uint32_t>(wirepool_pool_stats_json(handle(), &out)));
        return Bytes(out).str();
    }

    /// The connections (same JSON as GET /api/v1/connections: {"connections": [...]}).
    [[nodiscard]] std::string connections_json() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_connections_json",
                      static_cast<std::uint32_t>(wirepool_pool_connections_json(handle(), &out)));
        return Bytes(out).str();
    }

    /// The health (same JSON as GET /api/v1/pool/health: {"level": "healthy" |
    /// "degraded" | "unhealthy" | "critical", "reasons": [...], "history": [...]}).
    /// Still answers after `close()`: critical, "the pool is closed".
    [[nodiscard]] std::string health_json() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_health_json",
                      static_cast<std::uint32_t>(wirepool_pool_health_json(handle(), &out)));
        return Bytes(out).str();
    }

    /// The servers and their circuit breakers (same JSON as GET /api/v1/servers:
    /// {"servers": [{"id", "circuit", "consecutive_failures", ...}]}).
    [[nodiscard]] std::string servers_json() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_servers_json",
                      static_cast<std::uint32_t>(wirepool_pool_servers_json(handle(), &out)));
        return Bytes(out).str();
    }

    /// Request round-trip times (same JSON as GET /api/v1/pool/latency: {"bounds_us":
    /// [...], "counts": [...], "count", "sum_us", "p50_upper_bound_us",
    /// "p90_upper_bound_us", "p99_upper_bound_us"}); a percentile is the upper bound of
    /// the bucket holding it, null with no requests or above the last bound. Still
    /// answers after `close()`, as `stats_json()` does.
    [[nodiscard]] std::string request_latency_json() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_request_latency_json",
                      static_cast<std::uint32_t>(
                          wirepool_pool_request_latency_json(handle(), &out)));
        return Bytes(out).str();
    }

    /// Where the admin HTTP port listens ("127.0.0.1:41234", "[::1]:41234"): with
    /// health.listen on port 0, the port the system chose. std::nullopt when there is
    /// no port (no health.listen, or after `close()`, which stops it); errors throw.
    [[nodiscard]] std::optional<std::string> health_addr() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_health_addr",
                      static_cast<std::uint32_t>(wirepool_pool_health_addr(handle(), &out)));
        if (out == nullptr) {
            return std::nullopt;
        }
        return Bytes(out).str();
    }

    /// Closes one connection; the pool replaces it and its channels move at once.
    void close_connection(std::uint64_t connection_id) const {
        detail::check("wirepool_pool_close_connection",
                      static_cast<std::uint32_t>(
                          wirepool_pool_close_connection(handle(), connection_id)));
    }

    /// Replaces a ready connection make before break; returns the new connection's id.
    std::uint64_t recycle_connection(std::uint64_t connection_id) const {
        std::uint64_t replacement = 0;
        detail::check("wirepool_pool_recycle_connection",
                      static_cast<std::uint32_t>(wirepool_pool_recycle_connection(
                          handle(), connection_id, &replacement)));
        return replacement;
    }

    /// Opens one more connection (up to max_connections); returns its id.
    std::uint64_t open_connection() const {
        std::uint64_t id = 0;
        detail::check("wirepool_pool_open_connection",
                      static_cast<std::uint32_t>(wirepool_pool_open_connection(handle(), &id)));
        return id;
    }

    /// The run-time settings (still the last ones after `close()`).
    [[nodiscard]] Settings settings() const {
        const std::string json = settings_json();
        constexpr const char *call = "wirepool_pool_settings_json";
        Settings out;
        out.min_connections = detail::json_count(call, json, "min_connections");
        out.max_connections = detail::json_count(call, json, "max_connections");
        out.strategy = std::string(detail::json_member(call, json, "strategy"));
        return out;
    }

    /// The run-time settings as JSON (same object as GET /api/v1/pool/config).
    [[nodiscard]] std::string settings_json() const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_settings_json",
                      static_cast<std::uint32_t>(wirepool_pool_settings_json(handle(), &out)));
        return Bytes(out).str();
    }

    /// Changes the fields set in `change` (none set: nothing changes). A larger
    /// min_connections opens connections at once; a smaller one drains the surplus
    /// make before break. A refused change (min above max, max 0 or over 10000, an
    /// unknown strategy) throws `Error` with `ErrorCode::InvalidArgument`, saying what
    /// is wrong, and changes nothing; `ClosedError` once the pool is closed.
    void reconfigure(const SettingsChange &change) const {
        std::string json = "{";
        const auto add = [&json](std::string_view key, const std::string &value) {
            if (json.size() > 1) {
                json += ',';
            }
            json += detail::json_quote(key);
            json += ':';
            json += value;
        };
        if (change.min_connections) {
            add("min_connections", std::to_string(*change.min_connections));
        }
        if (change.max_connections) {
            add("max_connections", std::to_string(*change.max_connections));
        }
        if (change.strategy) {
            add("strategy", detail::json_quote(*change.strategy));
        }
        json += '}';
        reconfigure_json(json);
    }

    /// `reconfigure` from a JSON object with any of min_connections, max_connections
    /// and strategy (the body of POST /api/v1/pool/config); the message of a refusal
    /// names the key or value that is wrong.
    void reconfigure_json(std::string_view settings_json) const {
        const std::string json = detail::c_string("wirepool_pool_reconfigure_json",
                                                  "settings JSON", settings_json);
        detail::check("wirepool_pool_reconfigure_json",
                      static_cast<std::uint32_t>(
                          wirepool_pool_reconfigure_json(handle(), json.c_str())));
    }

    /// Waits up to `timeout` for at least one event and returns a JSON array of every
    /// queued event ("[]" on timeout).
    [[nodiscard]] std::string events_json(std::chrono::milliseconds timeout) const {
        wirepool_bytes *out = nullptr;
        detail::check("wirepool_pool_events_json",
                      static_cast<std::uint32_t>(wirepool_pool_events_json(
                          handle(), detail::to_timeout_ms(timeout), &out)));
        return Bytes(out).str();
    }

    [[nodiscard]] wirepool_pool *raw() const noexcept { return raw_; }

private:
    wirepool_pool *handle() const {
        if (raw_ == nullptr) {
            detail::throw_moved_from("Pool");
        }
        return raw_;
    }

    wirepool_pool *raw_ = nullptr;
};

} // namespace wirepool

#endif // WIREPOOL_HPP
