//! The desired subscriptions, kept in the order the user made them.
//!
//! Owned by the pool thread alone. Whatever walks the channels (placement on a new
//! connection, the restore after a reconnect, the hand-over to a replacement) walks
//! them in subscription order, so each connection is sent its subscribes in that
//! order: a venue that needs a snapshot channel before its deltas, or a trader who
//! subscribed the book before the trades, gets them back in the order asked for. A
//! channel subscribed again after an unsubscribe goes last; subscribing one already
//! desired keeps its place.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Where one desired channel lives.
#[derive(Debug, Default, Clone)]
pub(super) struct Placement {
    pub owner: Option<u64>,
    pub confirmed: bool,
    /// Connections whose codec failed encoding this channel's subscription.
    pub codec_failures: u32,
}

/// The channels placed on one connection.
#[derive(Debug, Default)]
struct Owned {
    /// Their subscription numbers: walked in subscription order.
    orders: BTreeSet<u64>,
    /// How many of them the connection has not confirmed yet.
    unconfirmed: usize,
}

/// A change of a channel's owner, for the published connections view: `Some` placed
/// on `connection`, `None` no longer there.
#[derive(Debug)]
pub(super) struct OwnerChange {
    pub connection: u64,
    pub order: u64,
    pub channel: Option<Arc<str>>,
}

/// The desired channels in subscription order, each with its placement, and indexes
/// kept as placements change so that nothing the pool thread does per message or per
/// pass walks every channel: the unplaced channels, the channels of each connection
/// and the count of confirmed ones. Adding, removing, placing and confirming a channel
/// cost O(log n); the channels of one connection, or the unplaced ones, cost their own
/// number.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Subscription number -> channel and placement: iterated in subscription order.
    by_order: BTreeMap<u64, (Arc<str>, Placement)>,
    /// Channel -> its subscription number.
    order_of: HashMap<Arc<str>, u64>,
    /// The number the next new subscription takes.
    next_order: u64,
    /// Subscription numbers of the channels on no connection.
    unplaced: BTreeSet<u64>,
    /// Connection -> the channels placed on it.
    owned: HashMap<u64, Owned>,
    /// Channels their connection confirmed.
    confirmed: usize,
    /// Owner changes not yet taken by `take_owner_changes`, oldest first.
    owner_changes: Vec<OwnerChange>,
}

impl Subscriptions {
    pub fn new() -> Subscriptions {
        Subscriptions::default()
    }

    pub fn len(&self) -> usize {
        self.order_of.len()
    }

    /// Channels confirmed by the connection they are placed on.
    pub fn confirmed(&self) -> usize {
        self.confirmed
    }

    /// Adds `channel` last, unplaced. False (and nothing changes, its place included)
    /// when it is already desired.
    pub fn insert(&mut self, channel: Arc<str>) -> bool {
        if self.order_of.contains_key(&channel) {
            return false;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.order_of.insert(Arc::clone(&channel), order);
        self.by_order.insert(order, (channel, Placement::default()));
        self.unplaced.insert(order);
        true
    }

    /// Removes `channel`; its placement as it stood (its owner is to be told).
    pub fn remove(&mut self, channel: &str) -> Option<Placement> {
        let order = self.order_of.remove(channel)?;
        let placement = self
            .by_order
            .get(&order)
            .map(|(_, placement)| placement.clone());
        self.take_off(order);
        self.unplaced.remove(&order);
        self.by_order.remove(&order);
        placement
    }

    /// The channel's placement, to read; changes go through the methods below, which
    /// keep the indexes.
    pub fn get(&self, channel: &str) -> Option<&Placement> {
        let order = self.order_of.get(channel)?;
        self.by_order.get(order).map(|(_, placement)| placement)
    }

    /// Places `channel` on `connection`, confirmed or not (a no-op for a channel not
    /// desired).
    pub fn place(&mut self, channel: &str, connection: u64, confirmed: bool) {
        let Some(&order) = self.order_of.get(channel) else {
            return;
        };
        self.take_off(order);
        self.unplaced.remove(&order);
        let owned = self.owned.entry(connection).or_default();
        owned.orders.insert(order);
        if confirmed {
            self.confirmed += 1;
        } else {
            owned.unconfirmed += 1;
        }
        if let Some((channel, placement)) = self.by_order.get_mut(&order) {
            placement.owner = Some(connection);
            placement.confirmed = confirmed;
            self.owner_changes.push(OwnerChange {
                connection,
                order,
                channel: Some(Arc::clone(channel)),
            });
        }
    }

    /// `connection` confirmed `channel`: true when it is the channel's owner (the
    /// codec's failures on it are then forgotten: a codec that failed on it once
    /// and then took it was not failing because of the channel).
    pub fn confirm(&mut self, channel: &str, connection: u64) -> bool {
        let Some(&order) = self.order_of.get(channel) else {
            return false;
        };
        let Some((_, placement)) = self.by_order.get_mut(&order) else {
            return false;
        };
        if placement.owner != Some(connection) {
            return false;
        }
        placement.codec_failures = 0;
        if !placement.confirmed {
            placement.confirmed = true;
            self.confirmed += 1;
            if let Some(owned) = self.owned.get_mut(&connection) {
                owned.unconfirmed -= 1;
            }
        }
        true
    }

    /// `connection` failed to subscribe `channel`: unconfirmed if it is its owner,
    /// and one codec failure more when the codec failed. The codec failures so far.
    pub fn subscribe_failed(
        &mut self,
        channel: &str,
        connection: u64,
        codec_failed: bool,
    ) -> Option<u32> {
        let order = *self.order_of.get(channel)?;
        let (_, placement) = self.by_order.get_mut(&order)?;
        if placement.owner == Some(connection) && placement.confirmed {
            placement.confirmed = false;
            self.confirmed -= 1;
            if let Some(owned) = self.owned.get_mut(&connection) {
                owned.unconfirmed += 1;
            }
        }
        if codec_failed {
            placement.codec_failures += 1;
        }
        Some(placement.codec_failures)
    }

    /// Takes every channel off `connection` (its own is gone or going); what the
    /// codec did with them stays. They are unplaced, in subscription order.
    pub fn unplace_all(&mut self, connection: u64) -> Vec<Arc<str>> {
        let Some(owned) = self.owned.remove(&connection) else {
            return Vec::new();
        };
        let mut channels = Vec::with_capacity(owned.orders.len());
        for order in owned.orders {
            if let Some((channel, placement)) = self.by_order.get_mut(&order) {
                if placement.confirmed {
                    self.confirmed -= 1;
                }
                placement.owner = None;
                placement.confirmed = false;
                self.unplaced.insert(order);
                self.owner_changes.push(OwnerChange {
                    connection,
                    order,
                    channel: None,
                });
                channels.push(Arc::clone(channel));
            }
        }
        channels
    }

    /// The channels on no connection, in subscription order.
    pub fn unplaced(&self) -> Vec<Arc<str>> {
        self.unplaced
            .iter()
            .filter_map(|order| self.by_order.get(order))
            .map(|(channel, _)| Arc::clone(channel))
            .collect()
    }

    /// Every channel with its placement, in subscription order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Placement)> {
        self.by_order
            .values()
            .map(|(channel, placement)| (channel, placement))
    }

    /// The channels placed on `connection_id`, in subscription order.
    pub fn owned_by(&self, connection_id: u64) -> Vec<Arc<str>> {
        self.owned
            .get(&connection_id)
            .map(|owned| {
                owned
                    .orders
                    .iter()
                    .filter_map(|order| self.by_order.get(order))
                    .map(|(channel, _)| Arc::clone(channel))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many channels are placed on `connection_id`.
    pub fn count_on(&self, connection_id: u64) -> usize {
        self.owned
            .get(&connection_id)
            .map_or(0, |owned| owned.orders.len())
    }

    /// How many channels placed on `connection_id` it has not confirmed yet.
    pub fn unconfirmed_on(&self, connection_id: u64) -> usize {
        self.owned
            .get(&connection_id)
            .map_or(0, |owned| owned.unconfirmed)
    }

    /// The owner changes since the last call, oldest first.
    pub fn take_owner_changes(&mut self) -> Vec<OwnerChange> {
        std::mem::take(&mut self.owner_changes)
    }

    /// Takes the channel numbered `order` off its connection, if it has one.
    fn take_off(&mut self, order: u64) {
        let Some((_, placement)) = self.by_order.get_mut(&order) else {
            return;
        };
        let Some(connection) = placement.owner.take() else {
            return;
        };
        let was_confirmed = std::mem::take(&mut placement.confirmed);
        if was_confirmed {
            self.confirmed -= 1;
        }
        if let Some(owned) = self.owned.get_mut(&connection) {
            owned.orders.remove(&order);
            if !was_confirmed {
                owned.unconfirmed -= 1;
            }
            if owned.orders.is_empty() {
                self.owned.remove(&connection);
            }
        }
        self.owner_changes.push(OwnerChange {
            connection,
            order,
            channel: None,
        });
    }
}

/// The placements as readers see them (`Pool::connections`, `Pool::stats`, the admin
/// port): the channels of each connection and the counts. The pool thread applies its
/// owner changes once per pass, so a pass costs what changed in it, not the number of
/// channels; a reader pays for the lists it asks for.
#[derive(Debug, Default)]
pub(super) struct PublishedPlacements {
    /// Connection -> subscription number -> channel: each list in subscription order.
    by_connection: HashMap<u64, BTreeMap<u64, Arc<str>>>,
    /// Desired channels.
    pub subscriptions: usize,
    /// Desired channels confirmed by their connection.
    pub active: usize,
}

impl PublishedPlacements {
    /// Applies `changes` in order, and the counts.
    pub fn apply(&mut self, changes: Vec<OwnerChange>, subscriptions: usize, active: usize) {
        for change in changes {
            match change.channel {
                Some(channel) => {
                    self.by_connection
                        .entry(change.connection)
                        .or_default()
                        .insert(change.order, channel);
                }
                None => {
                    if let Some(channels) = self.by_connection.get_mut(&change.connection) {
                        channels.remove(&change.order);
                        if channels.is_empty() {
                            self.by_connection.remove(&change.connection);
                        }
                    }
                }
            }
        }
        self.subscriptions = subscriptions;
        self.active = active;
    }

    /// The channels placed on `connection_id`, in subscription order.
    pub fn channels_of(&self, connection_id: u64) -> Vec<String> {
        self.by_connection
            .get(&connection_id)
            .map(|channels| {
                channels
                    .values()
                    .map(|channel| channel.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(subscriptions: &Subscriptions) -> Vec<&str> {
        subscriptions
            .iter()
            .map(|(channel, _)| channel.as_ref())
            .collect()
    }

    #[test]
    fn walks_channels_in_subscription_order_not_by_name() {
        let mut subscriptions = Subscriptions::new();
        for channel in ["trades.X", "book.X", "c", "a"] {
            assert!(subscriptions.insert(Arc::from(channel)));
        }
        assert_eq!(channels(&subscriptions), ["trades.X", "book.X", "c", "a"]);
    }

    #[test]
    fn a_repeated_subscribe_keeps_its_place_and_a_re_subscribe_goes_last() {
        let mut subscriptions = Subscriptions::new();
        for channel in ["b", "a", "c"] {
            subscriptions.insert(Arc::from(channel));
        }
        subscriptions.place("b", 7, false);
        assert!(!subscriptions.insert(Arc::from("b")), "already desired");
        assert_eq!(channels(&subscriptions), ["b", "a", "c"]);
        assert_eq!(
            subscriptions.get("b").and_then(|placement| placement.owner),
            Some(7),
            "a repeated subscribe leaves the placement alone"
        );
        assert!(subscriptions.remove("a").is_some());
        assert!(subscriptions.remove("a").is_none());
        assert!(subscriptions.get("a").is_none());
        subscriptions.insert(Arc::from("a"));
        assert_eq!(channels(&subscriptions), ["b", "c", "a"]);
        assert_eq!(subscriptions.len(), 3);
        assert_eq!(subscriptions.owned_by(7), [Arc::<str>::from("b")]);
    }

    #[test]
    fn the_indexes_follow_placing_confirming_failing_and_removing() {
        let mut subscriptions = Subscriptions::new();
        for channel in ["a", "b", "c", "d"] {
            subscriptions.insert(Arc::from(channel));
        }
        assert_eq!(subscriptions.unplaced().len(), 4);
        subscriptions.place("c", 1, false);
        subscriptions.place("a", 1, false);
        subscriptions.place("b", 2, false);
        assert_eq!(subscriptions.unplaced(), [Arc::<str>::from("d")]);
        assert_eq!(
            subscriptions.owned_by(1),
            [Arc::<str>::from("a"), Arc::from("c")],
            "a connection's channels in subscription order, not placement order"
        );
        assert_eq!(subscriptions.count_on(1), 2);
        assert_eq!(subscriptions.unconfirmed_on(1), 2);
        assert!(subscriptions.confirm("a", 1));
        assert!(!subscriptions.confirm("b", 1), "only the owner confirms");
        assert!(
            subscriptions.confirm("a", 1),
            "a repeated confirmation is still its"
        );
        assert_eq!(subscriptions.confirmed(), 1, "counted once");
        assert_eq!(subscriptions.unconfirmed_on(1), 1);
        assert_eq!(subscriptions.subscribe_failed("a", 1, true), Some(1));
        assert_eq!(subscriptions.confirmed(), 0);
        assert_eq!(subscriptions.unconfirmed_on(1), 2);
        subscriptions.confirm("b", 2);
        subscriptions.place("b", 1, true);
        assert_eq!(subscriptions.count_on(2), 0, "moved off connection 2");
        assert_eq!(subscriptions.confirmed(), 1);
        assert_eq!(
            subscriptions.unplace_all(1),
            [Arc::<str>::from("a"), Arc::from("b"), Arc::from("c")]
        );
        assert_eq!(subscriptions.confirmed(), 0);
        assert_eq!(subscriptions.unplaced().len(), 4);
        subscriptions.place("d", 3, false);
        subscriptions.confirm("d", 3);
        let removed = subscriptions.remove("d").expect("d was desired");
        assert_eq!(
            (removed.owner, removed.confirmed),
            (Some(3), true),
            "the placement as it stood, so its connection is told to unsubscribe"
        );
        assert_eq!(subscriptions.confirmed(), 0);
        assert_eq!(subscriptions.count_on(3), 0);
        assert_eq!(subscriptions.unplaced().len(), 3);
    }

    #[test]
    fn the_published_view_follows_the_owner_changes_in_subscription_order() {
        let mut subscriptions = Subscriptions::new();
        let mut view = PublishedPlacements::default();
        for channel in ["x", "y", "z"] {
            subscriptions.insert(Arc::from(channel));
        }
        subscriptions.place("z", 1, false);
        subscriptions.place("x", 1, false);
        subscriptions.place("y", 2, false);
        subscriptions.confirm("x", 1);
        view.apply(
            subscriptions.take_owner_changes(),
            subscriptions.len(),
            subscriptions.confirmed(),
        );
        assert_eq!(view.channels_of(1), ["x", "z"]);
        assert_eq!(view.channels_of(2), ["y"]);
        assert_eq!((view.subscriptions, view.active), (3, 1));
        subscriptions.unplace_all(1);
        subscriptions.place("x", 2, false);
        subscriptions.remove("y");
        view.apply(
            subscriptions.take_owner_changes(),
            subscriptions.len(),
            subscriptions.confirmed(),
        );
        assert!(view.channels_of(1).is_empty());
        assert_eq!(view.channels_of(2), ["x"]);
        assert_eq!((view.subscriptions, view.active), (2, 0));
        assert!(subscriptions.take_owner_changes().is_empty(), "taken once");
    }

    /// A client that subscribes and unsubscribes the same channels forever (a UI
    /// flipping between books) leaves nothing behind: no entry per round in any index,
    /// and the survivors keep their order.
    #[test]
    fn subscribe_unsubscribe_churn_keeps_one_entry_per_desired_channel() {
        let mut subscriptions = Subscriptions::new();
        subscriptions.insert(Arc::from("kept"));
        subscriptions.place("kept", 1, true);
        for round in 0..100_000 {
            let channel = if round % 2 == 0 { "flip" } else { "flop" };
            assert!(subscriptions.insert(Arc::from(channel)), "round {round}");
            // Some leave while still unplaced, the rest once placed.
            if round % 3 != 0 {
                subscriptions.place(channel, 1, false);
            }
            assert!(subscriptions.remove(channel).is_some(), "round {round}");
            // The pool thread takes the owner changes once per pass.
            if round % 256 == 0 {
                subscriptions.take_owner_changes();
            }
        }
        subscriptions.take_owner_changes();
        subscriptions.insert(Arc::from("last"));
        assert_eq!(channels(&subscriptions), ["kept", "last"]);
        assert_eq!(
            (
                subscriptions.by_order.len(),
                subscriptions.order_of.len(),
                subscriptions.unplaced.len(),
                subscriptions
                    .owned
                    .get(&1)
                    .map_or(0, |owned| owned.orders.len()),
                subscriptions.count_on(1),
                subscriptions.unconfirmed_on(1),
            ),
            (2, 2, 1, 1, 1, 0),
            "only the desired channels are held after 100 000 rounds of churn"
        );
    }
}
